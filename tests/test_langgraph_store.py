"""EvolveStore: conformance with LangGraph's InMemoryStore, then what SqliteStore semantics add.

Scenarios run against both stores with the same embedder and must give equal results. Where
LangGraph's own stores disagree (ordering without a query, dotted filter keys, list prefixes),
the evolve-only tests pin the SqliteStore behaviour EvolveStore follows.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    PutOp,
    SearchOp,
)
from langgraph.store.memory import InMemoryStore

from evolve.errors import StoreError
from evolve.stores import ExperienceStore, HashingEmbedder, default_embedder
from evolve.stores.langgraph_store import KIND, EvolveStore, matches

EMB = HashingEmbedder(64)
FIELDS = ["text", "summary"]


def lg_embed(texts: list[str]) -> list[list[float]]:
    return EMB.embed(list(texts)).tolist()


def memory_store() -> InMemoryStore:
    return InMemoryStore(index={"dims": EMB.dim, "embed": lg_embed, "fields": FIELDS})


@contextmanager
def evolve_store(
    path: Any, embedder: Any = EMB, index: dict[str, Any] | None = None, **kw: Any
) -> Iterator[EvolveStore]:
    """An EvolveStore over an ExperienceStore it does not own, closed on exit."""
    # No "embed" in the default config: the ExperienceStore's own embedder is used.
    es = ExperienceStore(path, embedder=embedder, read_only=kw.pop("read_only", False))
    try:
        yield EvolveStore(es, index=index or {"dims": embedder.dim, "fields": FIELDS}, **kw)
    finally:
        es.close()


def canon(res: Any) -> Any:
    """Comparable form of a result; scores are compared separately (float noise)."""
    if isinstance(res, Item):
        return (res.namespace, res.key, res.value)
    if isinstance(res, list):
        return [canon(r) for r in res]
    return res


def scores(res: list[Any]) -> list[float | None]:
    return [getattr(r, "score", None) for r in res]


DOCS = [
    (
        ("users", "u1", "memories"),
        "m1",
        {"text": "likes hiking in the alps", "kind": "pref", "n": 1, "ok": True},
    ),
    (
        ("users", "u1", "memories"),
        "m2",
        {"text": "allergic to peanuts", "kind": "health", "n": 2, "ok": False},
    ),
    (
        ("users", "u1", "notes"),
        "n1",
        {"text": "meeting notes about the budget", "kind": "note", "n": 3, "ok": True},
    ),
    (
        ("users", "u2", "memories"),
        "m1",
        {"text": "prefers tea over coffee", "kind": "pref", "n": 4, "ok": True},
    ),
    (
        ("users", "u2", "memories"),
        "m3",
        {"text": "hiking boots size 43", "summary": "shoe size", "kind": "pref", "n": 5, "ok": False},
    ),
    (("docs",), "d1", {"text": "python tutorial for beginners", "kind": "doc", "n": 6, "ok": True}),
    (
        ("docs", "v1"),
        "d2",
        {
            "text": "typescript guide",
            "summary": "a guide to typed javascript",
            "kind": "doc",
            "n": 7,
            "ok": True,
        },
    ),
    (("usersx",), "z", {"text": "hiking and peanuts and tea", "kind": "pref", "n": 8, "ok": True}),
]


def seed(store: BaseStore) -> None:
    for ns, key, value in DOCS:
        store.put(ns, key, value)


# ---------------------------------------------------------------------------------- scenarios
def sc_put_get_overwrite_delete(s: BaseStore) -> list[Any]:
    out = []
    s.put(("a", "b"), "k", {"x": 1, "nested": {"y": [1, 2, {"z": "é"}]}})
    out.append(s.get(("a", "b"), "k"))
    s.put(("a", "b"), "k", {"x": 2})
    out.append(s.get(("a", "b"), "k"))
    out.append(s.get(("a",), "k"))  # a parent namespace holds nothing
    s.delete(("a", "b"), "k")
    out.append(s.get(("a", "b"), "k"))
    s.delete(("a", "b"), "never-there")
    return out


def sc_search_filters(s: BaseStore) -> list[Any]:
    seed(s)
    prefixes = [(), ("users",), ("users", "u1"), ("users", "u1", "memories"), ("docs",), ("nothing",)]
    filters: list[dict[str, Any] | None] = [
        None,
        {"kind": "pref"},
        {"kind": "pref", "ok": True},
        {"ok": False},
        {"n": 4},
        {"n": 4.0},
        {"n": {"$gt": 3}},
        {"n": {"$gte": 3, "$lt": 7}},
        {"n": {"$lte": 2}},
        {"kind": {"$ne": "pref"}},
        {"kind": {"$eq": "doc"}},
        {"missing": "x"},
    ]
    # InMemoryStore lists in insertion order, SqliteStore (and EvolveStore) by recency: compare as sets.
    return [sorted(canon(s.search(p, filter=f, limit=100)), key=repr) for p in prefixes for f in filters]


def sc_search_query(s: BaseStore) -> list[Any]:
    seed(s)
    s.put(
        ("users", "u1", "memories"),
        "m9",
        {"text": "hiking hiking", "title": "peanut butter", "n": 0},
        index=["title"],
    )
    out = []
    for prefix, query, flt, limit, offset in [
        ((), "hiking", None, 10, 0),
        (("users",), "hiking", None, 10, 0),
        (("users",), "peanuts allergy", None, 3, 0),
        (("users",), "peanuts allergy", None, 3, 2),
        (("users", "u2"), "tea", {"kind": "pref"}, 10, 0),
        ((), "typed javascript guide", None, 2, 0),  # matches d2 through its second field
        ((), "beginners python", {"n": {"$gt": 5}}, 10, 0),
    ]:
        res = s.search(prefix, query=query, filter=flt, limit=limit, offset=offset)
        out.append((canon(res), scores(res)))
    return out


def sc_list_namespaces(s: BaseStore) -> list[Any]:
    for ns in [
        ("a", "b", "c"),
        ("a", "b", "d", "e"),
        ("a", "b", "d", "i"),
        ("a", "b", "f"),
        ("a", "c", "f"),
        ("b",),
        ("ab", "c"),
    ]:
        s.put(ns, "k", {"v": 1})
    calls: list[dict[str, Any]] = [
        {},
        {"prefix": ("a",)},
        {"prefix": ("a", "b"), "max_depth": 3},
        {"prefix": ("a", "*", "f")},
        {"suffix": ("f",)},
        {"suffix": ("*", "f")},
        {"prefix": ("a",), "suffix": ("f",)},
        {"max_depth": 1},
        {"max_depth": 2, "limit": 2, "offset": 1},
        {"limit": 3},
        {"offset": 5},
        {"prefix": ("zzz",)},
    ]
    return [s.list_namespaces(**c) for c in calls]


def sc_batch_mixed(s: BaseStore) -> list[Any]:
    s.put(("mix",), "old", {"text": "old hiking item", "n": 1})
    res = s.batch(
        [
            PutOp(("mix",), "a", {"text": "alpha hiking", "n": 2}),
            GetOp(("mix",), "old"),
            GetOp(("mix",), "a"),  # reads see the state before this batch's writes
            PutOp(("mix", "sub"), "b", {"text": "beta tea", "n": 3}),
            SearchOp(("mix",), query="hiking", limit=5),
            ListNamespacesOp(),
            PutOp(("mix",), "old", None),
            PutOp(("mix",), "a", {"text": "alpha hiking again", "n": 20}),  # last write wins
        ]
    )
    after = s.batch(
        [
            GetOp(("mix",), "old"),
            GetOp(("mix",), "a"),
            SearchOp(("mix",), query="tea", limit=5),
            SearchOp(("mix",), filter={"n": {"$gte": 3}}, limit=5),
            ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("mix",)),)),
        ]
    )
    after[3] = sorted(after[3], key=lambda i: i.key)  # no query: recency vs insertion order
    return [canon(r) for r in res] + [canon(r) for r in after] + [scores(res[4]), scores(after[2])]


SCENARIOS: list[Callable[[BaseStore], list[Any]]] = [
    sc_put_get_overwrite_delete,
    sc_search_filters,
    sc_search_query,
    sc_list_namespaces,
    sc_batch_mixed,
]


def assert_same(a: Any, b: Any) -> None:
    """Equal structures, floats equal to 1e-5 (float32 FAISS vs float64 numpy)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_conformance_with_in_memory_store(scenario: Callable[[BaseStore], list[Any]], tmp_path: Any) -> None:
    expected = canon(scenario(memory_store()))
    with evolve_store(tmp_path / "s.duckdb") as store:
        got = canon(scenario(store))
    assert_same(got, expected)


def test_conformance_with_langchain_style_embed_and_faiss_path(tmp_path: Any) -> None:
    # The same scenario through a plain embedding function and through the FAISS index path.
    index = {"dims": EMB.dim, "embed": lg_embed, "fields": FIELDS}
    with EvolveStore(path=tmp_path / "s.duckdb", index=index, exact_search_limit=0) as store:
        assert_same(sc_search_query(store), sc_search_query(memory_store()))


# ---------------------------------------------------------------------------------- evolve only
@pytest.fixture
def store(tmp_path: Any) -> Iterator[EvolveStore]:
    with evolve_store(tmp_path / "s.duckdb") as s:
        yield s


NESTED = [
    ("a", {"meta": {"kind": "x", "n": 3, "when": "2024-05-01"}, "tags": ["red", "big"], "text": "alpha"}),
    ("b", {"meta": {"kind": "y", "n": 7, "when": "2025-01-10"}, "tags": ["blue"], "text": "beta"}),
    ("c", {"meta": {"kind": "x", "n": 7.5, "flag": True}, "text": "gamma"}),
    ("d", {"meta": {"kind": None}, "n": "7", "text": "delta"}),
    ("e", {"text": "epsilon", "meta.kind": "x"}),  # a literal dotted key is not a path
]


def test_dotted_nested_filters_follow_sqlite_store(store: EvolveStore) -> None:
    for key, value in NESTED:
        store.put(("n",), key, value)

    def keys(flt: dict[str, Any], query: str | None = None) -> list[str]:
        return sorted(i.key for i in store.search(("n",), filter=flt, query=query, limit=50))

    assert keys({"meta.kind": "x"}) == ["a", "c"]
    assert keys({"meta.n": {"$gte": 7}}) == ["b", "c"]
    assert keys({"meta.n": 7}) == ["b"]
    assert keys({"meta.when": {"$gt": "2024-12-31"}}) == ["b"]  # strings compare as strings
    assert keys({"meta.kind": None}) == ["d", "e"]  # null or missing
    assert keys({"meta.kind": {"$ne": "x"}}) == ["b"]  # missing and null never match $ne
    assert keys({"meta.flag": True}) == ["c"]
    assert keys({"tags.0": "red"}) == ["a"]
    assert keys({"tags": ["blue"]}) == ["b"]  # list operands match exactly
    assert keys({"meta": {"kind": "y", "n": 7, "when": "2025-01-10"}}) == ["b"]
    assert keys({"meta": {"kind": "y"}}) == []  # a dict operand is equality, not a subset
    assert keys({"meta.kind": "x"}, query="gamma") == ["a", "c"]
    with pytest.raises(ValueError, match="Unsupported operator: \\$regex"):
        store.search(("n",), filter={"meta.n": {"$regex": "7"}})
    with pytest.raises(ValueError, match="Invalid filter key"):  # SqliteStore's words
        store.search(("n",), filter={"meta..n": 1})


def test_sql_filters_agree_with_the_python_reference(store: EvolveStore) -> None:
    for key, value in NESTED:
        store.put(("n",), key, value)
    values = dict(NESTED)
    operands = ["x", "7", 7, 7.5, True, None, "2024-06-01"]
    paths = ["meta.kind", "meta.n", "meta.when", "meta.flag", "n", "tags.0", "nope.deeper"]
    flts: list[dict[str, Any]] = []
    for p in paths:
        for v in operands:
            flts.append({p: v})
            flts.append({p: {"$ne": v}})
            if v is not None:
                flts += [{p: {op: v}} for op in ("$gt", "$gte", "$lt", "$lte")]
    results = store.batch([SearchOp(("n",), filter=flt, limit=50) for flt in flts])  # one batch, many ops
    for flt, res in zip(flts, results):
        want = sorted(k for k, v in values.items() if matches(v, flt))
        assert sorted(i.key for i in res) == want, flt


def test_list_prefix_and_whole_label_matching(store: EvolveStore) -> None:
    seed(store)
    as_tuple = [i.key for i in store.search(("users", "u1"), limit=50)]
    assert sorted(as_tuple) == ["m1", "m2", "n1"]
    assert [i.key for i in store.search(["users", "u1"], limit=50)] == as_tuple  # InMemoryStore: []
    assert {i.namespace for i in store.search(("users",), limit=50)} == {
        ("users", "u1", "memories"),
        ("users", "u1", "notes"),
        ("users", "u2", "memories"),
    }  # never ("usersx",)
    assert store.list_namespaces(prefix=["docs"]) == [("docs",), ("docs", "v1")]


def test_order_without_query_is_most_recent_first(store: EvolveStore) -> None:
    for k in ["k1", "k2", "k3", "k4"]:
        store.put(("o",), k, {"v": k})
    assert [i.key for i in store.search(("o",))] == ["k4", "k3", "k2", "k1"]
    store.put(("o",), "k2", {"v": "again"})
    assert [i.key for i in store.search(("o",))] == ["k2", "k4", "k3", "k1"]
    assert [i.key for i in store.search(("o",), limit=2, offset=1)] == ["k4", "k3"]
    store.batch([PutOp(("o",), "b1", {"v": 1}), PutOp(("o",), "b2", {"v": 2})])
    assert [i.key for i in store.search(("o",), limit=2)] == ["b2", "b1"]  # one timestamp: op order
    assert all(i.score is None for i in store.search(("o",)))


def test_write_order_breaks_equal_timestamps_across_stores_and_reopens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``seq`` keeps write order although it is only queried when another store may have written:
    puts through two stores on one file, then through a reopened one, all at one frozen time."""
    from datetime import datetime, timezone

    import evolve.stores.langgraph_store as lgs

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:  # type: ignore[override]
            return cls(2026, 1, 1, tzinfo=timezone.utc)

    monkeypatch.setattr(lgs, "datetime", Frozen)
    path = tmp_path / "s.duckdb"
    index = {"dims": EMB.dim, "fields": FIELDS}
    a = EvolveStore(ExperienceStore(path, embedder=EMB), index=index)  # type: ignore[arg-type]
    b = EvolveStore(ExperienceStore(path, embedder=EMB), index=index)  # type: ignore[arg-type]
    order: list[str] = []
    for i, st in enumerate([a, a, b, a, b, b, a]):
        st.put(("ns",), f"k{i}", {"text": f"item {i}"})
        order.append(f"k{i}")
    a.close()
    b.close()
    with ExperienceStore(path, embedder=EMB) as es:  # a store from before evolve_meta recorded the table
        es.conn.execute("DELETE FROM evolve_meta WHERE key = 'langgraph_items'")
    c = EvolveStore(ExperienceStore(path, embedder=EMB), index=index)  # type: ignore[arg-type]
    assert c.store.meta["langgraph_items"] == "1"  # probed once, recorded again
    c.put(("ns",), "k7", {"text": "item 7"})
    c.put(("ns",), "k0", {"text": "item 0, again"})  # an overwrite moves k0 to the front
    order = [k for k in order if k != "k0"] + ["k7", "k0"]
    assert [it.key for it in c.search(("ns",), limit=20)] == order[::-1]
    assert [it.key for it in c.search(("ns",), query="item", limit=20)]  # its vectors were replaced
    c.close()


def test_items_timestamps_and_emptied_namespaces(store: EvolveStore) -> None:
    store.put(("t",), "k", {"v": 1})
    first = store.get(("t",), "k")
    assert first is not None and first.created_at.tzinfo is not None
    store.put(("t",), "k", {"v": 2})
    second = store.get(("t",), "k")
    assert second is not None and second.value == {"v": 2}
    assert second.created_at == first.created_at and second.updated_at > first.updated_at
    store.put(("t",), "k", {"v": 3}, index=False)
    assert store.get(("t",), "k").created_at == first.created_at
    store.delete(("t",), "k")
    store.get(("ghost",), "k")
    assert store.list_namespaces() == []  # InMemoryStore keeps emptied and merely-read namespaces


def test_persistence_reopen_and_index_rebuild(tmp_path: Any) -> None:
    path = tmp_path / "s.duckdb"
    with evolve_store(path, exact_search_limit=0) as s:  # 0: query search goes through FAISS
        seed(s)
        before = s.search(("users",), query="hiking", limit=4)
        listed = s.list_namespaces()
    assert before and before[0].score is not None
    index_dir = tmp_path / "s.duckdb.index"
    assert (index_dir / f"{KIND}.index").exists()
    shutil.rmtree(index_dir)  # derived data: losing it loses nothing
    with evolve_store(path, exact_search_limit=0) as s:
        again = s.search(("users",), query="hiking", limit=4)
        assert canon(again) == canon(before)
        assert_same(scores(again), scores(before))
        assert s.list_namespaces() == listed
        assert s.get(("docs",), "d1").value == DOCS[5][2]
    assert (index_dir / f"{KIND}.index").exists()
    with evolve_store(path) as s:  # the exact DuckDB path ranks the same
        assert canon(s.search(("users",), query="hiking", limit=4)) == canon(before)
    with evolve_store(path, read_only=True) as s:
        assert canon(s.search(("users",), query="hiking", limit=4)) == canon(before)
        with pytest.raises(StoreError, match="read-only"):
            s.put(("docs",), "d9", {"text": "new"})


def test_changing_the_embedder_reindexes(tmp_path: Any) -> None:
    path = tmp_path / "s.duckdb"
    with evolve_store(path) as s:
        seed(s)
        s.put(("docs",), "skip", {"text": "hiking everywhere"}, index=False)
    other = HashingEmbedder(32)
    with evolve_store(path, embedder=other) as s:
        hits = s.search((), query="hiking", limit=3)
        assert hits and hits[0].key in {"m1", "m3", "z"}
        assert "skip" not in [h.key for h in s.search((), query="hiking", limit=50)]
        dims = s.store.conn.execute(
            "SELECT DISTINCT len(vec), model FROM vectors WHERE kind = ?", [KIND]
        ).fetchall()
        assert dims == [(32, other.name)]


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__(64)
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> Any:
        self.calls.append(list(texts))
        return super().embed(texts)


def test_batch_is_one_transaction_and_one_embedding_call(tmp_path: Any) -> None:
    emb = CountingEmbedder()
    with evolve_store(tmp_path / "s.duckdb", embedder=emb, index={"fields": ["text"]}) as s:
        ops = [PutOp(("b",), f"k{i}", {"text": f"memory {i % 10}"}) for i in range(50)]
        s.batch([*ops, SearchOp(("b",), query="memory 3", limit=3)])
        assert len(emb.calls) == 1 and len(emb.calls[0]) == 11  # 10 distinct texts + 1 query
        assert len(s.search(("b",), limit=100)) == 50
        assert s.search(("b",), query="memory 3", limit=1)[0].value == {"text": "memory 3"}
        bad = [PutOp(("b",), "new", {"text": "fine"}), PutOp(("b",), "bad", {"when": object()})]
        with pytest.raises(ValueError, match="not JSON-serialisable"):
            s.batch(bad)
        assert s.get(("b",), "new") is None  # the bad op sank the whole batch before any write
        n_vec = s.store.conn.execute("SELECT count(*) FROM vectors WHERE kind = ?", [KIND]).fetchall()[0][0]
        assert n_vec == 50
        s.put(("b",), "k0", {"text": "memory 0"}, index=False)  # an overwrite drops its vectors
        assert "k0" not in [h.key for h in s.search(("b",), query="memory 0", limit=50)]


def test_close_closes_a_handed_store_unless_told_not_to(tmp_path: Path) -> None:
    es = ExperienceStore(tmp_path / "a.duckdb", embedder=EMB)
    EvolveStore(es).close()  # the README's pattern: EvolveStore(store) takes the store over
    assert es.conn is None
    es = ExperienceStore(tmp_path / "b.duckdb", embedder=EMB)
    EvolveStore(es, close_store=False).close()
    assert es.conn is not None
    es.close()


def test_validation_errors(store: EvolveStore) -> None:
    with pytest.raises(InvalidNamespaceError):
        store.put((), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        store.put(("a.b",), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        store.batch([PutOp(("a.b",), "k", {"v": 1})])  # ops given straight to batch are checked too
    with pytest.raises(InvalidNamespaceError, match="langgraph"):
        store.put(("langgraph",), "k", {"v": 1})  # refused by the public put, as LangGraph's stores
    # ...but accepted through batch, as InMemoryStore and SqliteStore accept it there.
    store.batch([PutOp(("langgraph",), "k", {"v": 1})])
    assert store.get(("langgraph",), "k").value == {"v": 1}
    with pytest.raises(InvalidNamespaceError, match="tuple of strings"):
        store.search("docs")
    with pytest.raises(InvalidNamespaceError):
        store.get(("a", ""), "k")
    with pytest.raises(NotImplementedError):
        store.put(("a",), "k", {"v": 1}, ttl=5)
    with pytest.raises(ValueError, match="limit and offset"):
        store.search(("a",), limit=-1)


class GraphState(TypedDict):
    user: str
    fact: str
    recalled: list[str]


def remember(state: GraphState, *, store: BaseStore) -> dict[str, Any]:
    store.put(("users", state["user"], "facts"), f"f{len(state['fact'])}", {"text": state["fact"]})
    return {}


def recall(state: GraphState, *, store: BaseStore) -> dict[str, Any]:
    hits = store.search(("users", state["user"], "facts"), query=state["fact"], limit=3)
    return {"recalled": [h.value["text"] for h in hits]}


def test_langgraph_graph_uses_the_store(store: EvolveStore) -> None:
    g = StateGraph(GraphState)
    g.add_node("remember", remember)
    g.add_node("recall", recall)
    g.add_edge(START, "remember")
    g.add_edge("remember", "recall")
    g.add_edge("recall", END)
    app = g.compile(store=store)
    out = app.invoke({"user": "ann", "fact": "ann climbs on sundays", "recalled": []})
    assert out["recalled"] == ["ann climbs on sundays"]
    out = app.invoke({"user": "ann", "fact": "ann drinks green tea", "recalled": []})
    assert out["recalled"][0] == "ann drinks green tea" and len(out["recalled"]) == 2
    assert store.list_namespaces(prefix=("users",)) == [("users", "ann", "facts")]


def test_abatch_under_asyncio(tmp_path: Any) -> None:
    async def aembed(texts: list[str]) -> list[list[float]]:
        await asyncio.sleep(0)
        return lg_embed(texts)

    async def main() -> None:
        with EvolveStore(path=tmp_path / "s.duckdb", index={"embed": aembed, "fields": ["text"]}) as s:
            await asyncio.gather(*(s.aput(("as",), f"k{i}", {"text": f"note number {i}"}) for i in range(5)))
            assert (await s.aget(("as",), "k3")).value == {"text": "note number 3"}
            hits = await s.asearch(("as",), query="note number 3", limit=2)
            assert hits[0].key == "k3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
            res = await s.abatch([GetOp(("as",), "k1"), PutOp(("as",), "k1", None), ListNamespacesOp()])
            assert res[0].key == "k1" and res[2] == [("as",)]
            assert await s.aget(("as",), "k1") is None
            await s.adelete(("as",), "k2")
            assert len(await s.asearch(("as",))) == 3

    asyncio.run(main())


@pytest.mark.slow  # loads sentence-transformers (seconds), shared with other tests via default_embedder
def test_minilm_ranks_a_paraphrase_first(tmp_path: Any) -> None:
    minilm = default_embedder()  # SentenceTransformerEmbedder over the packaged all-MiniLM-L6-v2
    with evolve_store(tmp_path / "s.duckdb", embedder=minilm, index={"fields": ["text"]}) as s:
        s.put(("m",), "cat", {"text": "The cat sat on the mat all afternoon."})
        s.put(("m",), "stock", {"text": "Shares fell sharply after the earnings report."})
        s.put(("m",), "rain", {"text": "Heavy rain is expected over the weekend."})
        hits = s.search(("m",), query="A kitten was lounging on the rug.", limit=3)
        assert [h.key for h in hits][0] == "cat"
        assert hits[0].score > hits[1].score
