"""ExperienceStore on real DuckDB files and real FAISS indexes (HashingEmbedder unless MiniLM is the point)."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolve.errors import EmbedderError, StoreError
from evolve.schema import (
    Action,
    ActionSource,
    CauseEvidence,
    Diagnosis,
    EnvState,
    ExampleKind,
    FailureCause,
    Guardrail,
    GuardrailScope,
    KnowledgeStats,
    KnowledgeStatus,
    Observation,
    Outcome,
    RetrievalLog,
    Skill,
    StateDiff,
    Step,
    TeacherLogprobs,
    Timings,
    TokenUsage,
    TrainingExample,
    Trajectory,
)
from evolve.stores import ExperienceStore, HashingEmbedder, SentenceTransformerEmbedder, make_embedder
from evolve.stores import vector_index as vi
from evolve.stores.hybrid import CrossEncoderReranker, EmbeddingReranker, Reranker
from evolve.stores.keyword import BM25Index
from evolve.stores.tables import STORE_SCHEMA_VERSION

ROOMS = ["kitchen", "pantry", "garden", "cellar", "attic", "bedroom"]
OBJECTS = ["apple", "knife", "red key", "lamp", "chest", "fridge", "carrot", "shovel", "towel", "book"]
WORDS = ROOMS + OBJECTS + ["open", "take", "drop", "cook", "slice", "unlock", "door", "north", "eat"]


def observation(rng: np.random.Generator, room: str, inv: list[str], score: float, moves: int) -> Observation:
    vis = [str(x) for x in rng.choice(OBJECTS, size=3, replace=False)]
    text = f"-= {room.title()} =- You are in the {room}. You see a {vis[0]}, a {vis[1]} and a {vis[2]}."
    return Observation(
        text=text,
        goal="cook the apple",
        state=EnvState(
            location=room,
            inventory=list(inv),
            visible=vis,
            score=score,
            max_score=3.0,
            moves=moves,
            facts=[f"at(P, {room})"] + [f"in({o}, I)" for o in inv],
        ),
        admissible_actions=[f"take {o}" for o in vis] + ["look", "inventory", "go north"],
        info={"moves": moves, "nested": {"k": [1, 2.5, None]}},
    )


def make_traj(
    seed: int,
    n_steps: int = 5,
    namespace: str = "default",
    env: str = "textworld",
    outcome: Outcome = Outcome.success,
    **kw: object,
) -> Trajectory:
    """A TextWorld-like episode whose steps chain pre_state = previous post_state (as a recorder writes)."""
    rng = np.random.default_rng(seed)
    room, inv, score = str(rng.choice(ROOMS)), [], 0.0
    pre = observation(rng, room, inv, score, 0)
    steps = []
    for i in range(n_steps):
        act = str(rng.choice(pre.admissible_actions))
        if act.startswith("take"):
            inv = [*inv, act[5:]]
        if rng.random() < 0.3:
            room = str(rng.choice(ROOMS))
        post = observation(rng, room, inv, score, i + 1)
        diag = None
        if i % 2:
            diag = Diagnosis(
                step_index=i,
                diff=StateDiff(location_from="kitchen", location_to=room, inventory_added=inv[-1:]),
                causes=[CauseEvidence(cause=FailureCause.no_effect, evidence=f"nothing changed at {i}")],
                stagnating=True,
            )
        steps.append(
            Step(
                index=i,
                pre_state=pre,
                action=Action(text=act, thought="try it", source=ActionSource.policy, raw=f"> {act}"),
                post_state=post,
                reward=0.5 * (i % 3 == 0),
                done=i == n_steps - 1,
                diagnosis=diag,
                timings=Timings(policy_s=0.125, env_s=0.01, total_s=0.135),
                usage=TokenUsage(prompt_tokens=100 + i, completion_tokens=7, cost_usd=1e-5),
                retrieved=["skill-x"] if i == 0 else [],
            )
        )
        pre = post
    fields: dict[str, object] = {
        "id": f"traj-{seed}",
        "namespace": namespace,
        "task_id": f"task-{seed % 7}",
        "env": env,
        "goal": f"cook the apple in the {room}",
        "policy": "oracle",
        "outcome": outcome,
        "score": float(seed % 4),
        "max_score": 3.0,
        "steps": steps,
        "seed": seed,
        "metadata": {"summary": f"episode {seed} in the {room}", "tags": ["a", "b"]},
    }
    fields.update(kw)
    return Trajectory(**fields)  # type: ignore[arg-type]


def make_skill(i: int, namespace: str = "default", **kw: object) -> Skill:
    obj = OBJECTS[i % len(OBJECTS)]
    fields: dict[str, object] = {
        "id": f"skill-{namespace}-{i}",
        "namespace": namespace,
        "env": "textworld",
        "name": f"get the {obj}",
        "description": f"find and take the {obj} from the {ROOMS[i % len(ROOMS)]}",
        "preconditions": [f"at(P, {ROOMS[i % len(ROOMS)]})"],
        "steps": [f"go to {{room}} #{i}", f"take {obj}"],
        "slots": {"room": ROOMS[:2]},
        "verification": [f"in({obj}, I)"],
        "signature": f"sig{i % 3}",
        "tags": ["cooking"],
        "stats": KnowledgeStats(uses=3, successes=2, failures=1, effect=0.25),
        "provenance": [f"traj-{i}"],
    }
    fields.update(kw)
    return Skill(**fields)  # type: ignore[arg-type]


def make_guardrail(i: int, namespace: str = "default", **kw: object) -> Guardrail:
    fields: dict[str, object] = {
        "id": f"guard-{namespace}-{i}",
        "namespace": namespace,
        "env": "textworld",
        "root_cause": FailureCause.precondition_unmet,
        "description": f"the door {i} is locked without the key",
        "trigger": ["not in(red key, I)"],
        "forbidden_action": r"go north|open door",
        "scope": GuardrailScope.subgoal,
        "task_pattern": "cook.*",
        "provenance": [f"traj-{i}"],
    }
    fields.update(kw)
    return Guardrail(**fields)  # type: ignore[arg-type]


def make_example(i: int, namespace: str = "default", **kw: object) -> TrainingExample:
    fields: dict[str, object] = {
        "id": f"ex-{namespace}-{i}",
        "namespace": namespace,
        "kind": ExampleKind.sft,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "take apple"}],
        "chosen": "take apple",
        "privileged_context": "gold: take apple",
        "labels": [1.0, 0.0],
        "weight": 0.5,
        "provenance": [f"traj-{i}"],
        "metadata": {"n": i},
    }
    fields.update(kw)
    return TrainingExample(**fields)  # type: ignore[arg-type]


def open_store(path: Path, dim: int = 64, **kw: object) -> ExperienceStore:
    return ExperienceStore(path, embedder=HashingEmbedder(dim), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ExperienceStore]:
    s = open_store(tmp_path / "store.duckdb")
    yield s
    s.close()


def one_line_error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    assert "Traceback" not in msg
    return msg


def count(s: ExperienceStore, sql: str, params: list[object] | None = None) -> int:
    return int(s.conn.execute(sql, params or []).fetchall()[0][0])


# --------------------------------------------------------------------------- round trips


def test_every_model_round_trips_exactly(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    traj = make_traj(1, n_steps=6)
    # A pre_state that is *not* the previous post_state must survive too (it is stored in full).
    traj.steps[3] = traj.steps[3].model_copy(
        update={"pre_state": observation(np.random.default_rng(9), "attic", [], 0, 0)}
    )
    traj.diagnosis = Diagnosis(
        step_index=-1,
        causes=[CauseEvidence(cause=FailureCause.loop, evidence="looped look/look")],
        root_cause="no key",
        source="llm",
    )
    bare = Trajectory(id="traj-bare", task_id="t", env="crafter")  # no steps, defaults only
    skill, guard = make_skill(1), make_guardrail(2, status=KnowledgeStatus.active)
    examples = [
        make_example(1),
        make_example(2, kind=ExampleKind.preference, chosen="a", rejected="b"),
        make_example(3, kind=ExampleKind.reranker, query="q", documents=["d1", "d2"], labels=[0.9, 0.1]),
        make_example(4, kind=ExampleKind.privileged),
    ]
    with open_store(path) as s:
        s.add_trajectories([traj, bare])
        s.upsert_skills([skill])
        s.upsert_guardrails([guard])
        s.add_examples(examples)
        assert s.get_trajectory(traj.id) == traj
    # ...and again from the file, in a fresh process-level connection.
    with open_store(path) as s:
        assert s.get_trajectory(traj.id) == traj
        assert s.get_trajectory("traj-bare") == bare
        assert sorted(s.trajectories(), key=lambda t: t.id) == sorted([traj, bare], key=lambda t: t.id)
        assert s.skills() == [skill]
        assert s.guardrails() == [guard]
        assert s.get_knowledge(skill.id) == skill
        assert s.get_knowledge(guard.id) == guard
        assert s.examples() == sorted(examples, key=lambda e: e.id)
        # JSONL export -> import into another store is exact as well.
        for kind in ("trajectories", "skills", "guardrails", "examples"):
            assert s.export_jsonl(tmp_path / f"{kind}.jsonl", kind) > 0
    with open_store(tmp_path / "other.duckdb") as o:
        for kind in ("trajectories", "skills", "guardrails", "examples"):
            o.import_jsonl(tmp_path / f"{kind}.jsonl", kind)
        assert o.get_trajectory(traj.id) == traj
        assert o.skills() == [skill] and o.guardrails() == [guard]
        assert o.examples() == sorted(examples, key=lambda e: e.id)


def test_runs_stages_and_retrieval_logs_round_trip(store: ExperienceStore) -> None:
    logs = [
        RetrievalLog(
            trajectory_id="traj-1",
            step_index=i,
            knowledge_id=f"skill-{i}",
            kind="skill",
            score=0.5 + i,
            applicable=bool(i % 2),
            injected=True,
            reason="matched",
            outcome=None if i else "success",
            # The reranker's training data; rows without them (written by older code) read back empty.
            query="" if i == 2 else f"take the apple #{i}",
            rank=None if i == 2 else i,
            similarity=None if i == 2 else 0.25 * i,
            rerank_score=None if i else -1.5,
        )  # fmt: skip
        for i in range(3)
    ]
    store.log_retrievals(logs)
    assert store.retrieval_logs() == logs
    assert store.retrieval_logs(trajectory_id="traj-2") == []
    t0 = datetime.now(timezone.utc)
    store.upsert_run("run-1", {"stages": ["collect"], "n": 2}, "running")
    store.upsert_run("run-1", {"stages": ["collect"], "n": 3}, "done")
    store.set_stage("run-1", "collect", "done", {"episodes": 4})
    (run,) = store.runs()
    assert run["id"] == "run-1" and run["status"] == "done" and json.loads(run["job"])["n"] == 3
    assert t0 - timedelta(seconds=1) <= run["created_at"] <= run["updated_at"] <= datetime.now(timezone.utc)
    stage = store.stages("run-1")["collect"]
    assert stage["status"] == "done" and stage["data"] == {"episodes": 4}
    assert stage["updated_at"].tzinfo is not None


def test_batched_ingest_and_replace_by_id(store: ExperienceStore) -> None:
    trajs = [make_traj(i, n_steps=3 + i % 5) for i in range(40)]
    assert store.add_trajectories(trajs) == 40
    n_steps = sum(len(t.steps) for t in trajs)
    assert count(store, "SELECT count(*) FROM steps") == n_steps
    n_diag = sum(1 for t in trajs for s in t.steps if s.diagnosis)
    assert count(store, "SELECT count(*) FROM diagnoses") == n_diag
    # Replace ten of them with shorter versions (and a duplicate id inside one batch: last wins).
    new = [make_traj(i, n_steps=2, outcome=Outcome.failure) for i in range(10)]
    dup = make_traj(0, n_steps=1, outcome=Outcome.error)
    store.add_trajectories([*new, dup])
    assert store.count_trajectories() == 40
    assert (
        count(store, "SELECT count(*) FROM steps")
        == n_steps - sum(len(t.steps) for t in trajs[:10]) + 9 * 2 + 1
    )
    assert (
        count(
            store,
            "SELECT count(*) FROM (SELECT trajectory_id, idx FROM steps GROUP BY 1, 2 HAVING count(*) > 1)",
        )
        == 0
    )
    assert store.get_trajectory("traj-0") == dup
    assert store.get_trajectory("traj-5") == new[5]
    assert store.count_trajectories(outcome="failure") == 9
    assert store.count_trajectories(outcome=["failure", "error"]) == 10


def test_store_namespace_is_the_default_for_items_that_name_none(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.duckdb", namespace="tenant") as s:
        s.add_trajectories([Trajectory(id="t1", task_id="t", env="e")])
        s.upsert_skills([Skill(id="k1", name="n")])
        s.add_examples([TrainingExample(id="x1", kind=ExampleKind.sft)])
        s.add_trajectories([Trajectory(id="t2", task_id="t", env="e", namespace="default")])
        assert [t.id for t in s.trajectories()] == ["t1"]
        assert s.get_trajectory("t1").namespace == "tenant"
        assert [k.namespace for k in s.skills()] == ["tenant"]
        assert [x.namespace for x in s.examples()] == ["tenant"]
        assert [t.id for t in s.trajectories("default")] == ["t2"]


# --------------------------------------------------------------------------- namespaces


def test_namespaces_isolate_tenants(store: ExperienceStore) -> None:
    for ns in ("alice", "bob"):
        store.add_trajectories([make_traj(i, namespace=ns, id=f"{ns}-t{i}") for i in range(5)])
        store.upsert_skills([make_skill(i, ns) for i in range(8)])
        store.upsert_guardrails([make_guardrail(i, ns) for i in range(3)])
        store.add_examples([make_example(i, ns) for i in range(2)])
    assert {"alice", "bob"} <= set(store.list_namespaces())
    for ns in ("alice", "bob"):
        assert {t.namespace for t in store.trajectories(ns)} == {ns}
        assert len(store.trajectories(ns)) == 5
        assert {k.namespace for k in store.skills(ns)} == {ns}
        assert {g.namespace for g in store.guardrails(ns)} == {ns}
        assert {e.namespace for e in store.examples(ns)} == {ns}
        for kind in ("skill", "guardrail", "trajectory"):
            for mode in ("hybrid", "dense", "keyword"):
                hits = store.search("take the apple near the door", kind, k=50, namespace=ns, mode=mode)
                assert hits, (kind, mode)
                assert {h.namespace for h in hits} == {ns}
        assert store.stats(ns)["skills"] == 8
    with pytest.raises(StoreError):
        store.get_trajectory("alice-t0", namespace="bob")


@pytest.fixture(scope="module")
def shared_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, ExperienceStore]]:
    """One store per index type, shared by all examples of the property test (each in fresh namespaces)."""
    d = tmp_path_factory.mktemp("property")
    stores = {t: open_store(d / f"p{t}.duckdb", hnsw_threshold=t) for t in (4, 50_000)}
    yield stores
    for s in stores.values():
        s.close()


_EXAMPLE = itertools.count()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
        ),
        min_size=1,
        max_size=40,
    ),
    query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
    queried=st.sampled_from(["a", "b", "c", "d"]),
    mode=st.sampled_from(["hybrid", "dense", "keyword", "vector"]),
    k=st.integers(1, 12),
    hnsw_threshold=st.sampled_from([4, 50_000]),
)
def test_search_never_crosses_namespaces(
    shared_stores: dict[int, ExperienceStore],
    items: list[tuple[str, str]],
    query: str,
    queried: str,
    mode: str,
    k: int,
    hnsw_threshold: int,
) -> None:
    # Every example writes to namespaces of its own, so the rows of all earlier examples are
    # other tenants' rows that must never come back.
    s, ex = shared_stores[hnsw_threshold], next(_EXAMPLE)
    s.upsert_skills(
        [
            Skill(id=f"e{ex}-s{i}", namespace=f"e{ex}-{ns}", name=text, description=text)
            for i, (ns, text) in enumerate(items)
        ]
    )
    ns = f"e{ex}-{queried}"

    def run() -> list:  # noqa: ANN202
        if mode == "vector":
            return s.search_vector(s.embedder.embed([query])[0], "skill", k=k, namespace=ns)
        return s.search(query, "skill", k=k, namespace=ns, mode=mode)  # type: ignore[arg-type]

    in_ns = sum(1 for n, _ in items if n == queried)
    if not in_ns:
        with pytest.raises(StoreError, match="unknown namespace"):
            run()
        return
    hits = run()
    assert all(h.namespace == ns for h in hits)
    assert len({h.id for h in hits}) == len(hits) <= k
    if mode in ("dense", "vector"):  # the filter is exact: as many hits as the namespace can give
        assert len(hits) == min(k, in_ns)


def test_delete_namespace_removes_everything_of_it(store: ExperienceStore) -> None:
    for ns in ("keep", "drop"):
        store.add_trajectories([make_traj(i, namespace=ns, id=f"{ns}-{i}") for i in range(4)])
        store.upsert_skills([make_skill(i, ns) for i in range(4)])
        store.upsert_guardrails([make_guardrail(i, ns) for i in range(2)])
        store.add_examples([make_example(i, ns) for i in range(2)])
        store.upsert_run(f"run-{ns}", {"x": 1}, "running", namespace=ns)
        store.set_stage(f"run-{ns}", "collect", "done")
        store.search("apple", "skill", namespace=ns)
        store.search("apple", "trajectory", namespace=ns)
    before = store.stats("keep")
    store.delete_namespace("drop")
    before["namespaces"].remove("drop")
    assert "drop" not in store.list_namespaces()
    for table in ("trajectories", "steps", "diagnoses", "skills", "guardrails", "knowledge_versions",
                  "examples", "runs", "vectors"):  # fmt: skip
        assert count(store, f"SELECT count(*) FROM {table} WHERE namespace = 'drop'") == 0, table
    assert store.stages("run-drop") == {} and store.stages("run-keep")
    assert store.stats("keep") == before
    assert {h.namespace for h in store.search("apple", "skill", k=20, namespace="keep")} == {"keep"}
    with pytest.raises(StoreError, match="unknown namespace 'drop'"):
        store.search("apple", "skill", namespace="drop")
    with pytest.raises(StoreError, match="unknown namespace"):
        store.delete_namespace("drop")


def test_delete_trajectory_cascades_through_provenance(store: ExperienceStore) -> None:
    store.add_trajectories([make_traj(i) for i in range(3)])
    store.upsert_skills(
        [
            make_skill(0, provenance=["traj-0"]),
            make_skill(1, provenance=["traj-1", "traj-0"]),
            make_skill(2, provenance=["traj-2"]),
        ]
    )
    store.upsert_guardrails(
        [make_guardrail(0, provenance=["traj-0"]), make_guardrail(1, provenance=["traj-1"])]
    )
    store.add_examples([make_example(0, provenance=["traj-0"]), make_example(1, provenance=["traj-2"])])
    for kind in ("skill", "guardrail", "trajectory"):
        store.search("apple", kind)
    counts = store.delete_trajectory("traj-0")
    assert counts["trajectories"] == 1 and counts["steps"] == 5
    assert counts["skills"] == 2 and counts["guardrails"] == 1 and counts["examples"] == 1
    assert [k.id for k in store.skills()] == ["skill-default-2"]
    assert [g.id for g in store.guardrails()] == ["guard-default-1"]
    assert [e.id for e in store.examples()] == ["ex-default-1"]
    assert count(store, "SELECT count(*) FROM steps WHERE trajectory_id = 'traj-0'") == 0
    assert count(store, "SELECT count(*) FROM diagnoses WHERE trajectory_id = 'traj-0'") == 0
    dead = ["traj-0", "skill-default-0", "skill-default-1", "guard-default-0"]
    assert count(store, "SELECT count(*) FROM vectors WHERE list_contains(?, ref_id)", [dead]) == 0
    assert count(store, "SELECT count(*) FROM knowledge_versions WHERE list_contains(?, id)", [dead]) == 0
    for kind in ("skill", "guardrail", "trajectory"):
        hits = store.search("apple key door kitchen", kind, k=20)
        assert not {h.id for h in hits} & set(dead)
    assert {h.id for h in store.search("apple", "trajectory", k=20, mode="dense")} == {"traj-1", "traj-2"}


# --------------------------------------------------------------------------- FAISS index lifecycle


def _fill(s: ExperienceStore, n: int, start: int = 0) -> None:
    s.upsert_skills(
        [
            make_skill(i, description=" ".join(np.random.default_rng(i).choice(WORDS, 6)))
            for i in range(start, start + n)
        ]
    )


def _ids(hits: list) -> list[tuple[str, float]]:  # noqa: ANN001
    return [(h.id, round(h.score, 5)) for h in hits]


QUERIES = ["take the apple", "unlock the door with the red key", "cook carrot in the kitchen", "lamp attic"]


def test_index_persisted_then_rebuilt_identically_when_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as s:
        _fill(s, 60)
        before = [_ids(s.search(q, "skill", k=10, mode=m)) for q in QUERIES for m in ("dense", "hybrid")]
    index_file = Path(str(path) + ".index") / "skill.index"
    assert index_file.exists() and index_file.with_suffix(".json").exists()
    builds: list[int] = []
    real_build = vi.VectorIndex.build
    monkeypatch.setattr(
        vi.VectorIndex, "build", lambda self, v, *a: (builds.append(len(v)), real_build(self, v, *a))[1]
    )
    with open_store(path) as s:  # the saved index is loaded, not rebuilt
        assert [
            _ids(s.search(q, "skill", k=10, mode=m)) for q in QUERIES for m in ("dense", "hybrid")
        ] == before
    assert builds == []
    for f in index_file.parent.iterdir():
        f.unlink()
    index_file.parent.rmdir()
    with open_store(path) as s:
        assert [
            _ids(s.search(q, "skill", k=10, mode=m)) for q in QUERIES for m in ("dense", "hybrid")
        ] == before
    assert builds == [60] and index_file.exists()
    # A corrupt index file is also just rebuilt.
    index_file.write_bytes(b"garbage")
    with open_store(path) as s:
        assert [_ids(s.search(q, "skill", k=10, mode="dense")) for q in QUERIES] == before[::2]
    assert builds == [60, 60]
    # A valid FAISS file of a foreign type (a bare flat index, not our id map) is rebuilt too.
    import faiss

    dim = json.loads(index_file.with_suffix(".json").read_text())["dim"]
    foreign = faiss.IndexFlatIP(dim)
    foreign.add(np.zeros((60, dim), dtype="float32"))
    faiss.write_index(foreign, str(index_file))
    with open_store(path) as s:
        assert [_ids(s.search(q, "skill", k=10, mode="dense")) for q in QUERIES] == before[::2]
    assert builds == [60, 60, 60]


def test_stale_index_is_extended_with_rows_of_another_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.duckdb"
    builds: list[int] = []
    real_build = vi.VectorIndex.build
    monkeypatch.setattr(
        vi.VectorIndex, "build", lambda self, v, *a: (builds.append(len(v)), real_build(self, v, *a))[1]
    )
    a = open_store(path)
    _fill(a, 30)
    a.search("apple", "skill")
    assert builds == [30]
    b = open_store(path)  # a second instance on the same file (same process)
    _fill(b, 20, start=30)
    b.upsert_skills([make_skill(100, name="zebra crossing", description="a unique zebra striped skill")])
    hits = a.search("zebra striped", "skill", k=3, mode="dense")
    assert hits[0].id == "skill-default-100"
    assert a.vector_index("skill").count == 51
    assert builds == [30]  # extended, not rebuilt
    b.close()
    a.close()
    # The file on disk is stale relative to rows added later: a new instance extends it too.
    with open_store(path) as c:
        _fill(c, 5, start=200)
    with open_store(path) as d:
        assert d.vector_index("skill").count == 56
        exact = d.search("zebra striped", "skill", k=56, mode="dense")
    assert builds == [30]
    assert exact[0].id == "skill-default-100"
    # Replacing rows changes existing vids: that cannot be extended, so the index is rebuilt.
    with open_store(path) as e:
        e.upsert_skills([make_skill(0, description="now about a giraffe")])
        assert e.search("giraffe", "skill", k=1, mode="dense")[0].id == "skill-default-0"
        assert e.vector_index("skill").count == 56
    assert builds == [30, 56]


def test_embedder_dimension_change_rebuilds_and_reembeds(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path, dim=64) as s:
        _fill(s, 40)
        s.add_trajectories([make_traj(i) for i in range(5)])
        s.search("apple", "skill")
        s.search("apple", "trajectory")
        assert s.vector_index("skill").dim == 64
    with open_store(path, dim=128) as s:
        hits = s.search("unlock the door with the red key", "skill", k=10, mode="dense")
        assert s.vector_index("skill").dim == 128
        assert s.search("apple", "trajectory", k=3)
        rows = s.conn.execute("SELECT DISTINCT kind, model, len(vec) FROM vectors ORDER BY 1").fetchall()
        assert rows == [("skill", "hash:128", 128), ("trajectory", "hash:128", 128)]
        assert count(s, "SELECT count(*) FROM vectors WHERE kind = 'skill'") == 40
    with open_store(tmp_path / "fresh.duckdb", dim=128) as f:  # same as a store built at 128-d from scratch
        _fill(f, 40)
        assert _ids(f.search("unlock the door with the red key", "skill", k=10, mode="dense")) == _ids(hits)


def _clustered(n: int, dim: int, seed: int, n_clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(hits: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(h) & set(e)) / len(e) for h, e in zip(hits, exact)]))


def test_flat_switches_to_hnsw_with_high_recall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dim, n = 32, 3000
    x = _clustered(n, dim, 0)
    ids = [f"v{i}" for i in range(n)]
    nss = ["a" if i % 3 else "b" for i in range(n)]  # two tenants, 2:1
    rows = list(zip(ids, nss, ids))
    q = _clustered(100, dim, 1)
    with open_store(tmp_path / "s.duckdb", hnsw_threshold=2000) as s:
        s.add_vectors("bench", rows[:1500], x[:1500], model="synthetic")
        assert s.vector_index("bench").kind == "flat"
        s.add_vectors("bench", rows[1500:], x[1500:], model="synthetic")
        idx = s.vector_index("bench")
        assert idx.kind == "hnsw" and idx.count == n
        vid_to_row = dict(s.conn.execute("SELECT vid, ref_id FROM vectors WHERE kind = 'bench'").fetchall())
        exact = [[ids[j] for j in row] for row in np.argsort(-(q @ x.T), axis=1)[:, :10]]
        assert _recall([[vid_to_row[v] for v, _ in idx.search(qv, 10)] for qv in q], exact) >= 0.9
        # Within one tenant: exact over its reconstructed vectors (small), or HNSW with an id filter.
        for limit in (vi.EXACT_FILTER_LIMIT, 10):
            monkeypatch.setattr(vi, "EXACT_FILTER_LIMIT", limit)
            for ns in ("a", "b"):
                mine = np.flatnonzero(np.array(nss) == ns)
                truth = [[ids[mine[j]] for j in row] for row in np.argsort(-(q @ x[mine].T), axis=1)[:, :10]]
                hits = [s.search_vector(qv, "bench", k=10, namespace=ns) for qv in q]
                assert all(h.namespace == ns for hs in hits for h in hs)
                assert _recall([[h.id for h in hs] for hs in hits], truth) >= (1.0 if limit > 10 else 0.9)
    # Reopened, the HNSW index comes back from disk as HNSW.
    with open_store(tmp_path / "s.duckdb", hnsw_threshold=2000) as s:
        assert s.vector_index("bench").kind == "hnsw"


def test_large_namespaces_get_an_index_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions by namespace: exact isolation, recall, a namespace moving out of the pool when it
    grows, persistence (no rebuild on reopen), and a stale part file rebuilt from DuckDB."""
    dim = 32
    x = _clustered(3000, dim, 0)
    nss = ["big"] * 1200 + ["mid"] * 500 + [f"t{i}" for i in range(1300)]  # 1300 namespaces of 1
    mix = np.random.default_rng(1).permutation(3000)
    x, nss = x[mix], [nss[i] for i in mix]
    ids = [f"v{i}" for i in range(3000)]
    rows = list(zip(ids, nss, ids))
    q = _clustered(40, dim, 2)
    builds: list[int] = []
    real_build = vi.VectorIndex.build
    monkeypatch.setattr(
        vi.VectorIndex, "build", lambda self, v, *a: (builds.append(len(v)), real_build(self, v, *a))[1]
    )
    path = tmp_path / "s.duckdb"

    def check(s: ExperienceStore) -> None:
        for ns in ("big", "mid", "t7"):
            mine = np.flatnonzero(np.array(nss) == ns)
            truth = [[ids[mine[j]] for j in row] for row in np.argsort(-(q @ x[mine].T), axis=1)[:, :10]]
            hits = [s.search_vector(qv, "bench", k=10, namespace=ns) for qv in q]
            assert all(h.namespace == ns for hs in hits for h in hs)
            assert _recall([[h.id for h in hs] for hs in hits], truth) >= 0.95

    with open_store(path, hnsw_threshold=500, partition_min=600) as s:
        s.add_vectors("bench", rows[:2000], x[:2000], model="synthetic")
        idx = s.vector_index("bench")
        big = int(np.sum(np.array(nss[:2000]) == "big"))
        mid = int(np.sum(np.array(nss[:2000]) == "mid"))
        assert big >= 600 > mid and set(idx.parts) == {"big"} and idx.parts["big"].kind == "hnsw"
        assert idx.kind == "hnsw" and "1 namespace indexes" in idx.describe()
        assert idx.pool.count == 2000 - big and idx.count == 2000
        s.add_vectors("bench", rows[2000:], x[2000:], model="synthetic")  # "mid" reaches 500 < 600
        s.add_vectors(
            "bench", [(f"m{i}", "mid", "") for i in range(100)], _clustered(100, dim, 3), model="synthetic"
        )
        x = np.concatenate([x, _clustered(100, dim, 3)])
        ids += [f"m{i}" for i in range(100)]
        nss += ["mid"] * 100
        idx = s.vector_index("bench")  # extended, "mid" (600) moved out of the pool
        assert set(idx.parts) == {"big", "mid"} and idx.count == 3100 and builds == [2000]
        check(s)
        # Unscoped searches (LangGraph's) see every part.
        every = {v for qv in q[:5] for v, _ in idx.search(qv, 50)}
        assert len(every) > 50
    with open_store(path, hnsw_threshold=500, partition_min=600) as s:  # loaded, not rebuilt
        check(s)
        assert builds == [2000]
    part_files = sorted(Path(str(path) + ".index").glob("bench.*.part"))
    assert len(part_files) == 2
    part_files[0].write_bytes(Path(str(path) + ".index", "bench.index").read_bytes())  # another index
    with open_store(path, hnsw_threshold=500, partition_min=600) as s:
        check(s)
        assert builds == [2000, 3100]


def test_a_batch_is_written_all_or_nothing(store: ExperienceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from evolve.stores import _part

    trajs = [make_traj(i, n_steps=3 + i % 7) for i in range(60)]
    assert store.add_trajectories(trajs) == 60
    assert {t.id: t for t in store.trajectories()} == {t.id: t for t in trajs}
    assert count(store, "SELECT count(*) FROM steps") == sum(len(t.steps) for t in trajs)
    # A table that fails to append (here the diagnoses, after the steps) undoes the whole batch,
    # the replacement of traj-0 included.
    real = _part.Part.append
    calls: list[str] = []

    def fail_diagnoses(self: _part.Part, table: object, arrow: object) -> None:
        calls.append(getattr(table, "name", ""))
        if calls[-1] == "diagnoses":
            raise duckdb.IOException("disk full")
        real(self, table, arrow)  # type: ignore[arg-type]

    monkeypatch.setattr(_part.Part, "append", fail_diagnoses)
    more = [make_traj(100 + i, n_steps=5) for i in range(30)]
    with pytest.raises(duckdb.IOException):
        store.add_trajectories([make_traj(0, n_steps=1), *more])
    assert calls == ["trajectories", "steps", "diagnoses"]
    assert store.count_trajectories() == 60 and store.get_trajectory("traj-0") == trajs[0]
    assert count(store, "SELECT count(*) FROM steps") == sum(len(t.steps) for t in trajs)


def test_stores_of_a_process_share_one_duckdb_and_release_their_files(tmp_path: Path) -> None:
    """Each store attaches its file to one DuckDB instance: two stores of one file share it, and
    the file is free for another process once the last is closed, or collected unclosed."""
    import gc

    path = tmp_path / "s.duckdb"
    a = open_store(path)
    b = open_store(path)
    a.upsert_skills([make_skill(0)])
    assert [k.id for k in b.skills()] == ["skill-default-0"]
    other = open_store(tmp_path / "other.duckdb")
    other.upsert_skills([make_skill(1), make_skill(2)])
    a.close()
    b.upsert_skills([make_skill(3)])  # still attached for b
    assert len(b.skills()) == 2 and len(other.skills()) == 2
    b.close()
    out = _reads_in_subprocess(path, "SELECT count(*) FROM skills")
    assert out.strip() == "[(2,)]"
    c = open_store(path)
    c.upsert_skills([make_skill(4)])
    del c  # never closed: released when collected, as a DuckDB connection closed its database
    gc.collect()
    assert _reads_in_subprocess(path, "SELECT count(*) FROM skills").strip() == "[(3,)]"
    assert not Path(str(path) + ".wal").exists()  # detaching checkpointed it
    other.close()


def test_store_search_through_hnsw_matches_exact(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.duckdb", hnsw_threshold=100) as s:
        _fill(s, 400)
        assert s.vector_index("skill").kind == "hnsw"
        emb = HashingEmbedder(64)
        vecs = dict(s.conn.execute("SELECT ref_id, vec FROM vectors WHERE kind = 'skill'").fetchall())
        ids = list(vecs)
        mat = np.array([vecs[i] for i in ids], dtype=np.float32)
        recall = []
        for q in QUERIES + ["knife", "shovel garden", "eat the apple", "towel book chest"]:
            exact = {ids[j] for j in np.argsort(-(mat @ emb.embed([q])[0]))[:10]}
            got = {h.id for h in s.search(q, "skill", k=10, mode="dense")}
            recall.append(len(got & exact) / 10)
        assert np.mean(recall) >= 0.9


def test_filters_and_unknown_filter_column(store: ExperienceStore) -> None:
    store.upsert_skills(
        [
            make_skill(
                i,
                status=[KnowledgeStatus.active, KnowledgeStatus.candidate, KnowledgeStatus.retired][i % 3],
                env=["tw", "sw"][i % 2],
            )
            for i in range(12)
        ]
    )
    store.add_trajectories(
        [make_traj(i, outcome=[Outcome.success, Outcome.failure][i % 2]) for i in range(6)]
    )
    for mode in ("hybrid", "dense", "keyword"):
        hits = store.search("take the apple", "skill", k=20, filters={"status": "active"}, mode=mode)
        assert hits and all(store.get_knowledge(h.id).status == KnowledgeStatus.active for h in hits)
        hits = store.search(
            "take the apple", "skill", k=20, filters={"status": ["active", "retired"], "env": "tw"}, mode=mode
        )
        got = {(store.get_knowledge(h.id).status, store.get_knowledge(h.id).env) for h in hits}
        assert got and got <= {(KnowledgeStatus.active, "tw"), (KnowledgeStatus.retired, "tw")}
    assert (
        len(store.search("apple", "skill", k=20, filters={"status": KnowledgeStatus.retired}, mode="dense"))
        == 4
    )
    assert store.search("apple", "skill", filters={"status": "nonexistent"}) == []
    hits = store.search("apple", "trajectory", k=20, filters={"outcome": "failure"}, mode="dense")
    assert {h.id for h in hits} == {"traj-1", "traj-3", "traj-5"}
    assert [s.status for s in store.skills(status="active", env="tw")] == [KnowledgeStatus.active] * 2
    with pytest.raises(StoreError, match="cannot filter skill on colour") as e:
        store.search("apple", "skill", filters={"colour": "red"})
    assert "status" in one_line_error(e)
    with pytest.raises(StoreError, match="unknown search mode"):
        store.search("apple", "skill", mode="fuzzy")  # type: ignore[arg-type]


def test_query_embedder_of_another_dimension_is_a_clear_error(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.duckdb", dim=64) as s:
        s.add_vectors(
            "bench", [("a", "default", "x")], np.ones((1, 384), dtype=np.float32) / np.sqrt(384), model="m"
        )
        with pytest.raises(StoreError, match="384") as e:
            s.search("x", "bench", mode="dense")
        one_line_error(e)


# --------------------------------------------------------------------------- bad input loses nothing


def test_corrupt_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    data = np.random.default_rng(0).bytes(64 * 1024)
    path.write_bytes(data)
    with pytest.raises(StoreError, match="not a readable DuckDB file") as e:
        open_store(path)
    one_line_error(e)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.duckdb"]


def _reads_in_subprocess(path: Path, sql: str) -> str:
    code = f"import duckdb; c = duckdb.connect({str(path)!r}); print(c.execute({sql!r}).fetchall())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_foreign_duckdb_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "theirs.duckdb"
    c = duckdb.connect(str(path))
    c.execute("CREATE TABLE payroll (name VARCHAR, salary INTEGER)")
    c.execute("INSERT INTO payroll VALUES ('ada', 10), ('bob', 20)")
    c.close()
    with pytest.raises(StoreError, match="not an evolve store") as e:
        open_store(path)
    assert "payroll" in one_line_error(e)
    # Nothing was added and the file is not held: another process can open and read it.
    out = _reads_in_subprocess(path, "SELECT table_name FROM information_schema.tables ORDER BY 1")
    assert out.strip() == "[('payroll',)]"
    out = _reads_in_subprocess(path, "SELECT * FROM payroll ORDER BY name")
    assert out.strip() == "[('ada', 10), ('bob', 20)]"


def test_unknown_namespace_and_missing_items(store: ExperienceStore) -> None:
    store.upsert_skills([make_skill(0)])
    for call in (
        lambda: store.search("apple", "skill", namespace="nobody"),
        lambda: store.delete_namespace("nobody"),
    ):
        with pytest.raises(StoreError, match="unknown namespace 'nobody' \\(known: default\\)") as e:
            call()
        one_line_error(e)
    with pytest.raises(StoreError, match="no trajectory 'nope'"):
        store.get_trajectory("nope")
    with pytest.raises(StoreError, match="no skill or guardrail"):
        store.get_knowledge("nope")
    (Path(store.path).parent / "a-dir").mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        ExperienceStore(Path(store.path).parent / "a-dir", embedder=HashingEmbedder(8))


def test_invalid_jsonl_line_imports_nothing(store: ExperienceStore, tmp_path: Path) -> None:
    store.add_trajectories([make_traj(i) for i in range(3)])
    good = tmp_path / "good.jsonl"
    store.export_jsonl(good)
    lines = good.read_text().splitlines()
    other = open_store(tmp_path / "other.duckdb")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1].replace('"task_id":', '"task_idx":'), lines[2]]) + "\n")
    with pytest.raises(StoreError, match=r"bad\.jsonl:2: invalid trajectory") as e:
        other.import_jsonl(bad)
    assert "nothing imported" in one_line_error(e)
    bad.write_text(lines[0] + "\n\n" + lines[1][:50] + "\n")
    with pytest.raises(StoreError, match=r"bad\.jsonl:3: "):
        other.import_jsonl(bad)
    assert other.count_trajectories() == 0
    with pytest.raises(StoreError, match="no such file"):
        other.import_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(StoreError, match="cannot import 'bananas'"):
        other.import_jsonl(good, kind="bananas")
    assert other.import_jsonl(good) == 3 and other.count_trajectories() == 3
    other.close()


def test_missing_embedder_path(tmp_path: Path) -> None:
    for make in (
        lambda: SentenceTransformerEmbedder(tmp_path / "no-model"),
        lambda: make_embedder(str(tmp_path / "no-model")),
    ):
        with pytest.raises(EmbedderError, match="does not exist") as e:
            make()
        one_line_error(e)
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(EmbedderError, match="could not load") as e:
        SentenceTransformerEmbedder(tmp_path / "empty-model")
    one_line_error(e)


HOLD = """
import sys, time
from evolve.stores import ExperienceStore, HashingEmbedder
s = ExperienceStore(sys.argv[1], embedder=HashingEmbedder(16))
print("ready", flush=True)
time.sleep(120)
"""


def test_store_locked_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as s:
        s.upsert_skills([make_skill(0)])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=f"in use by pid {holder.pid}") as e:
            open_store(path)
        one_line_error(e)
        with pytest.raises(StoreError, match=f"in use by pid {holder.pid} \\(waited 0.3 s\\)"):
            open_store(path, lock_timeout_s=0.3)
    finally:
        holder.kill()
        holder.wait()
    with open_store(path) as s:
        assert [k.id for k in s.skills()] == ["skill-default-0"]


WRITER = """
import sys
sys.path.insert(0, sys.argv[3])
from test_store import make_skill, open_store
w = int(sys.argv[2])
for i in range(12):
    # Open, write, close: the file is free between writes, so the other writer gets its turn.
    with open_store(sys.argv[1], lock_timeout_s=120) as s:
        s.upsert_skills([make_skill(100 * w + i)])
print("done", flush=True)
"""


def test_two_processes_writing_one_store_wait_for_each_other(tmp_path: Path) -> None:
    """Two writers on one file: each open waits (lock_timeout_s) while the other holds it; no write is lost."""
    path = tmp_path / "s.duckdb"
    open_store(path).close()
    tests_dir = str(Path(__file__).resolve().parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), tests_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (1, 2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    with open_store(path) as s:
        got = sorted(k.id for k in s.skills())
    assert got == sorted(f"skill-default-{100 * w + i}" for w in (1, 2) for i in range(12))


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as s:
        s.upsert_skills([make_skill(0)])
        s.conn.execute(
            "UPDATE evolve_meta SET value = ? WHERE key = 'schema_version'", [str(STORE_SCHEMA_VERSION + 1)]
        )
    with pytest.raises(StoreError, match="newer evolve") as e:
        open_store(path)
    one_line_error(e)
    # Refused without touching it (and without holding it open).
    out = _reads_in_subprocess(path, "SELECT value FROM evolve_meta WHERE key = 'schema_version'")
    assert out.strip() == f"[('{STORE_SCHEMA_VERSION + 1}',)]"


def test_read_only_store_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with pytest.raises(StoreError, match="does not exist"):
        open_store(path, read_only=True)
    traj = make_traj(0)
    with open_store(path) as s:
        s.add_trajectories([traj])
    with open_store(path, read_only=True) as r:
        assert r.get_trajectory("traj-0") == traj
        with pytest.raises(StoreError, match="read-only") as e:
            r.add_trajectories([make_traj(1)])
        one_line_error(e)
        assert r.count_trajectories() == 1


INGEST_LOOP = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_store import make_traj
from evolve.stores import ExperienceStore, HashingEmbedder
s = ExperienceStore(sys.argv[1], embedder=HashingEmbedder(16))
rng = np.random.default_rng(0)
pool = [make_traj(i, n_steps=int(rng.integers(1, 12))) for i in range(150)]
print("ready", flush=True)
i = 0
while True:  # appends new ids and replaces old ones, in batches of 50
    batch = [t.model_copy(update={"id": f"traj-{(i * 50 + j) % 700}"}) for j, t in enumerate(pool[(i * 50) % 150:][:50])]
    s.add_trajectories(batch)
    i += 1
"""


def test_kill_mid_ingest_leaves_a_consistent_store(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", INGEST_LOOP, str(path), tests_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(2.0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open_store(path) as s:
        n = s.count_trajectories()
        assert n > 0
        bad = s.conn.execute(
            """SELECT t.id, t.n_steps, count(st.idx) FROM trajectories t LEFT JOIN steps st ON st.trajectory_id = t.id
               GROUP BY 1, 2 HAVING count(st.idx) <> t.n_steps"""
        ).fetchall()
        assert bad == []
        assert (
            count(s, "SELECT count(*) FROM steps WHERE trajectory_id NOT IN (SELECT id FROM trajectories)")
            == 0
        )
        assert (
            count(
                s, "SELECT count(*) FROM diagnoses WHERE trajectory_id NOT IN (SELECT id FROM trajectories)"
            )
            == 0
        )
        trajs = s.trajectories()
        assert len(trajs) == n and all(len(t.steps) == len({st.index for st in t.steps}) for t in trajs)
        s.add_trajectories([make_traj(1000)])  # and it is writable again
        assert s.count_trajectories() == n + 1


# --------------------------------------------------------------------------- knowledge versions


def test_knowledge_versions_and_rollback(store: ExperienceStore) -> None:
    v1 = make_skill(0, description="open the fridge first")
    store.upsert_skills([v1])
    v2 = v1.model_copy(update={"version": 2, "description": "open the fridge with the handle"})
    v3 = v1.model_copy(update={"version": 3, "description": "zebra instructions"})
    store.upsert_skills([v2])
    store.upsert_skills([v3])
    assert store.knowledge_versions(v1.id) == [1, 2, 3]
    assert store.get_knowledge(v1.id) == v3
    assert store.search("zebra", "skill", k=1, mode="keyword")[0].id == v1.id
    back = store.rollback(v1.id, 1)
    assert back.version == 4 and back.description == v1.description
    assert store.get_knowledge(v1.id) == back
    assert store.knowledge_versions(v1.id) == [1, 2, 3, 4]
    assert [k.description for k in store.skills()] == [v1.description]
    assert store.search("zebra", "skill", mode="keyword") == []
    # Re-upserting the same version replaces its history row instead of duplicating it.
    store.upsert_skills([back])
    assert store.knowledge_versions(v1.id) == [1, 2, 3, 4]
    g1 = make_guardrail(0)
    store.upsert_guardrails([g1, g1.model_copy(update={"version": 2, "forbidden_action": "eat .*"})])
    assert store.rollback(g1.id, 1).forbidden_action == g1.forbidden_action
    assert store.get_knowledge(g1.id).version == 3
    with pytest.raises(StoreError, match=r"has no version 9 \(versions: \[1, 2, 3\]\)") as e:
        store.rollback(g1.id, 9)
    one_line_error(e)


# --------------------------------------------------------------------------- the real embedder


def test_semantic_search_with_minilm(tmp_path: Path) -> None:
    """The default embedder (MiniLM from the PyPI package) finds a paraphrase no keyword matches."""
    with ExperienceStore(tmp_path / "s.duckdb") as s:
        s.upsert_skills(
            [
                Skill(id="door", name="unlock door", description="use the brass key to open the locked door"),
                Skill(id="cook", name="cook meal", description="fry the sliced carrot on the stove"),
                Skill(id="dig", name="dig", description="dig a hole in the garden with the shovel"),
            ]
        )
        hits = s.search("prepare some vegetables for dinner", "skill", k=3, mode="dense")
        assert hits[0].id == "cook"
        assert s.embedder.dim == 384 and s.vector_index("skill").dim == 384


# --------------------------------------------------------------------------- issue 13: contracts


def test_done_episodes_filters_and_leaves_errors_out(store: ExperienceStore) -> None:
    store.add_trajectories(
        [
            make_traj(1, run_id="r1", arm="base"),
            make_traj(2, run_id="r1", arm="base", outcome=Outcome.error),
            make_traj(3, run_id="r1", arm="memory", env="alfworld"),
            make_traj(4, run_id="r2", arm="base"),
            make_traj(5, run_id="r1", arm="base", namespace="other"),
        ]
    )
    key = {i: (f"task-{i % 7}", i) for i in range(6)}
    assert store.done_episodes() == {key[1], key[3], key[4]}
    assert store.done_episodes(include_errors=True) == {key[1], key[2], key[3], key[4]}
    assert store.done_episodes(run_id="r1", arm="base", include_errors=True) == {key[1], key[2]}
    assert store.done_episodes(run_id="r1", env="alfworld") == {key[3]}
    assert store.done_episodes("other") == {key[5]}
    assert store.done_episodes(run_id="nope") == set()


def test_reset_stages_forgets_one_runs_stages_only(store: ExperienceStore) -> None:
    store.add_trajectories([make_traj(1, run_id="r1")])
    for run in ("r1", "r2"):
        store.set_stage(run, "collect", "done", {"n": 1})
        store.set_stage(run, "distill", "done")
    store.reset_stages("r1")
    assert store.stages("r1") == {}
    assert set(store.stages("r2")) == {"collect", "distill"}
    assert store.count_trajectories(run_id="r1") == 1  # episodes stay


def test_record_usage_adds_stats_as_new_versions(store: ExperienceStore) -> None:
    sk, g = make_skill(0), make_guardrail(0)  # skill stats start at uses 3, successes 2, failures 1
    store.upsert_skills([sk])
    store.upsert_guardrails([g])
    n = store.record_usage(
        {sk.id: (4, 3, 1), g.id: (2, 0, 2), "nobody": (1, 1, 0), "skill-default-1": (0, 0, 0)},
        effects={sk.id: -0.125, "nobody": 1.0},
    )
    assert n == 2  # unknown ids skipped
    s2, g2 = store.get_knowledge(sk.id), store.get_knowledge(g.id)
    assert (s2.stats.uses, s2.stats.successes, s2.stats.failures, s2.stats.effect) == (7, 5, 2, -0.125)
    assert (g2.stats.uses, g2.stats.successes, g2.stats.failures) == (
        g.stats.uses + 2,
        g.stats.successes,
        g.stats.failures + 2,
    )
    assert g2.stats.effect == g.stats.effect  # no effect given: kept
    assert (s2.version, g2.version) == (2, 2)
    assert store.knowledge_versions(sk.id) == [1, 2]
    # The usage history is versioned: the old stats are still there to roll back to.
    assert store.rollback(sk.id, 1).stats == sk.stats
    assert store.get_knowledge(sk.id).version == 3
    # The confidence column follows the new stats (retrieval filters and sorts on it).
    assert store.record_usage({sk.id: (10, 10, 0)}) == 1
    conf = store.conn.execute("SELECT confidence FROM skills WHERE id = ?", [sk.id]).fetchall()[0][0]
    assert conf == pytest.approx(store.get_knowledge(sk.id).stats.confidence)
    assert store.record_usage({}) == 0
    assert store.record_usage({sk.id: (0, 0, 0)}) == 0  # nothing to add: no new version
    assert store.knowledge_versions(sk.id) == [1, 2, 3, 4]


def test_record_usage_is_one_transaction(store: ExperienceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from evolve.stores import tables

    store.upsert_skills([make_skill(0), make_skill(1)])
    store.upsert_guardrails([make_guardrail(0)])
    real = tables.append

    def failing(conn, table, arrow):  # noqa: ANN001, ANN202
        if table is tables.KNOWLEDGE_VERSIONS:  # after the skills and guardrails rows were replaced
            raise RuntimeError("disk full")
        return real(conn, table, arrow)

    monkeypatch.setattr(tables, "append", failing)
    with pytest.raises(RuntimeError):
        store.record_usage(
            {"skill-default-0": (1, 1, 0), "skill-default-1": (1, 0, 1), "guard-default-0": (1, 0, 1)}
        )
    monkeypatch.undo()
    assert [k.stats for k in store.skills()] == [make_skill(0).stats, make_skill(1).stats]
    assert [k.version for k in store.skills() + store.guardrails()] == [1, 1, 1]
    assert store.knowledge_versions("skill-default-0") == [1]


def _logprobs(h: str, teacher: str = "qwen@local", positions: int = 6, k: int = 5) -> TeacherLogprobs:
    rng = np.random.default_rng(abs(hash(h)) % 2**32)
    ids = [[int(x) for x in rng.choice(151_936, size=k - (p % 2), replace=False)] for p in range(positions)]
    lps = [
        sorted((float(x) for x in np.log(rng.dirichlet(np.ones(k + 1)))[: len(r)]), reverse=True) for r in ids
    ]
    tail = [
        float(np.log1p(-min(np.exp(r).sum(), 1.0))) if np.exp(r).sum() < 1 else float("-inf") for r in lps
    ]
    tail[0] = float("-inf")  # the top k held all the mass
    return TeacherLogprobs(prompt_hash=h, teacher=teacher, token_ids=ids, logprobs=lps, tail_logprob=tail)


def test_teacher_logprobs_round_trip_as_float16(tmp_path: Path) -> None:
    items = [_logprobs(f"h{i}") for i in range(4)] + [_logprobs("h0", teacher="gpt@api", positions=2)]
    empty = TeacherLogprobs(prompt_hash="h-empty", teacher="qwen@local")
    path = tmp_path / "s.duckdb"
    with open_store(path) as s:
        assert s.put_teacher_logprobs([*items, empty]) == 6
    with open_store(path, read_only=True) as s:  # survives a reopen; readable read-only
        got = s.get_teacher_logprobs(["h0", "h1", "h3", "missing", "h-empty", "h0"], "qwen@local")
        assert set(got) == {"h0", "h1", "h3", "h-empty"}
        assert got["h-empty"].token_ids == [] and got["h-empty"].tail_logprob == []
        for h in ("h0", "h1", "h3"):
            want, have = next(t for t in items if t.prompt_hash == h and t.teacher == "qwen@local"), got[h]
            assert have.token_ids == want.token_ids  # exact, ragged k kept
            assert [len(r) for r in have.logprobs] == [len(r) for r in want.logprobs]
            for a, b in zip(have.logprobs, want.logprobs):
                np.testing.assert_allclose(a, np.float16(b), rtol=0)  # float16 exactly, nothing worse
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(have.tail_logprob, np.float16(want.tail_logprob), rtol=0)
            assert have.tail_logprob[0] == float("-inf")
        (other,) = s.get_teacher_logprobs(["h0"], "gpt@api").values()
        assert len(other.token_ids) == 2
        assert s.get_teacher_logprobs([], "qwen@local") == {}
        stored = s.conn.execute(
            "SELECT octet_length(logprobs) FROM teacher_logprobs WHERE prompt_hash = 'h1' AND teacher = 'qwen@local'"
        ).fetchall()
        assert stored == [(6 * 5 * 2,)]  # float16: 2 bytes per log-prob
    with open_store(path) as s:  # a put replaces by (prompt_hash, teacher)
        s.put_teacher_logprobs([_logprobs("h1", positions=1)])
        assert len(s.get_teacher_logprobs(["h1"], "qwen@local")["h1"].token_ids) == 1
        assert count(s, "SELECT count(*) FROM teacher_logprobs") == 6
    bad = TeacherLogprobs(
        prompt_hash="x", teacher="t", token_ids=[[1, 2]], logprobs=[[-0.1]], tail_logprob=[-3.0]
    )
    with open_store(path) as s, pytest.raises(ValueError, match="position 0"):
        s.put_teacher_logprobs([bad])


_V1_RETRIEVAL_LOG = """CREATE TABLE retrieval_log (
    id VARCHAR, namespace VARCHAR, trajectory_id VARCHAR, step_index INTEGER, knowledge_id VARCHAR,
    kind VARCHAR, score DOUBLE, applicable BOOLEAN, injected BOOLEAN, reason VARCHAR,
    outcome VARCHAR, created_at TIMESTAMPTZ)"""


def _schema_1_store(path: Path) -> None:
    """A store file as evolve wrote it before schema 2 (no teacher cache, a 12-column retrieval_log)."""
    with open_store(path) as s:
        s.upsert_skills([make_skill(0)])
        s.add_trajectories([make_traj(1)])
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE retrieval_log")
    con.execute("DROP TABLE teacher_logprobs")
    con.execute(_V1_RETRIEVAL_LOG)
    con.execute(
        "INSERT INTO retrieval_log VALUES ('ret-old', 'default', 'traj-1', 0, 'skill-default-0', 'skill', "
        "0.5, true, true, 'matched', 'success', '2024-05-01 12:00:00+00')"
    )
    con.execute("UPDATE evolve_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()


def test_schema_1_store_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _schema_1_store(path)
    with open_store(path, read_only=True) as s:  # read-only: opened as it is, new columns read empty
        assert s.schema_version == 1
        (old,) = s.retrieval_logs()
        assert (old.id, old.query, old.rank, old.similarity, old.rerank_score) == (
            "ret-old",
            "",
            None,
            None,
            None,
        )
        assert s.get_teacher_logprobs(["h"], "t") == {}
    with open_store(path) as s:
        assert s.schema_version == STORE_SCHEMA_VERSION
        (old,) = s.retrieval_logs()
        assert old.id == "ret-old" and old.score == 0.5 and old.outcome == "success" and old.query == ""
        assert old.created_at == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
        new = RetrievalLog(
            trajectory_id="traj-1", step_index=1, knowledge_id="skill-default-0", kind="skill", score=0.7,
            applicable=True, injected=False, query="take the apple", rank=0, similarity=0.6, rerank_score=2.5,
        )  # fmt: skip
        s.log_retrievals([new])
        assert s.retrieval_logs()[1] == new
        s.put_teacher_logprobs([_logprobs("h")])
        assert set(s.get_teacher_logprobs(["h"], "qwen@local")) == {"h"}
        assert [k.id for k in s.skills()] == [
            "skill-default-0"
        ] and s.count_trajectories() == 1  # nothing lost
    out = _reads_in_subprocess(path, "SELECT value FROM evolve_meta WHERE key = 'schema_version'")
    assert out.strip() == f"[('{STORE_SCHEMA_VERSION}',)]"


def test_every_table_is_declared_once_and_matches_the_file(store: ExperienceStore) -> None:
    """The DuckDB columns of every table are exactly its spec's, in order; Arrow follows the spec."""
    from evolve.stores import tables

    rows = store.conn.execute(
        # The process's stores share one DuckDB instance: only this store's catalog.
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_catalog = current_database() ORDER BY table_name, ordinal_position"
    ).fetchall()
    have: dict[str, list[tuple[str, str]]] = {}
    for t, c, typ in rows:
        have.setdefault(t, []).append((c, typ))
    for spec in tables.TABLES:
        want = [(c, "TIMESTAMP WITH TIME ZONE" if typ == "TIMESTAMPTZ" else typ) for c, typ in spec.columns]
        assert have[spec.name] == want, spec.name
        assert spec.schema.names == spec.names
    assert set(have) - {t.name for t in tables.TABLES} <= {"langgraph_items"}


# --------------------------------------------------------------------------- one hybrid-search path


class _ByLength:
    """A deterministic test reranker: shorter texts first."""

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        return -np.array([len(t) for t in texts], dtype=np.float64)


def _scores_of_today(texts: list[str], embedder: HashingEmbedder | None, query: str) -> np.ndarray:
    """KnowledgeIndex.similarities as it was before the shared path (the reference)."""
    n = len(texts)
    dense = np.zeros(n)
    if embedder is not None:
        dense = np.clip(embedder.embed(texts) @ embedder.embed([query])[0], 0.0, 1.0)
    kw = BM25Index(texts).scores(query)
    if kw.max() > 0:
        kw = kw / kw.max()
    return 0.7 * dense + 0.3 * kw


@pytest.mark.parametrize("with_embedder", [True, False])
def test_knowledge_index_scores_are_todays_and_rerank_picks_from_a_deeper_pool(with_embedder: bool) -> None:
    from evolve.skills.retrieval import KnowledgeIndex, RetrievalConfig

    emb = HashingEmbedder(64) if with_embedder else None
    skills = [make_skill(i, status=KnowledgeStatus.active) for i in range(12)]
    skills[3] = make_skill(3, status=KnowledgeStatus.active, description="x")  # the shortest text
    idx = KnowledgeIndex(skills, [], emb, config=RetrievalConfig(max_candidates=4))
    texts = [s.text() for s in idx.skills]
    for q in ("take the apple from the kitchen", "red key", "zzz"):
        sims = idx.similarities(q)
        np.testing.assert_array_equal(sims, _scores_of_today(texts, emb, q))
        # No reranker: the best by similarity, as before; a query changes nothing.
        want = [int(i) for i in np.argsort(-sims, kind="stable")[:4]]
        assert idx.candidates(sims) == want == idx.candidates(sims, q)
        assert idx.rerank_scores == {}
    idx.hybrid.reranker = _ByLength()
    q = "take the apple"
    sims = idx.similarities(q)
    np.testing.assert_array_equal(sims, _scores_of_today(texts, emb, q))  # the reranker never changes them
    got = idx.candidates(sims, q)
    pool = [int(i) for i in np.argsort(-sims, kind="stable")[:16]]
    assert got == sorted(pool, key=lambda i: len(texts[i]))[:4]
    assert set(idx.rerank_scores) == set(pool) and idx.rerank_scores[got[0]] == -len(texts[got[0]])
    assert idx.candidates(sims) == [
        int(i) for i in np.argsort(-sims, kind="stable")[:4]
    ]  # no query: no rerank


def test_store_search_fuses_by_rrf_and_reranks_when_asked(store: ExperienceStore) -> None:
    _fill(store, 60)
    q, k = "take the red key in the kitchen", 5
    hybrid = store.search(q, "skill", k=k)
    depth = max(4 * k, 20)
    dense = store.search(q, "skill", k=depth, mode="dense")
    kw = store.search(q, "skill", k=depth, mode="keyword")
    fused: dict[str, float] = {}
    for lst in (dense, kw):
        for rank, h in enumerate(lst):
            fused[h.id] = fused.get(h.id, 0.0) + 1.0 / (60 + rank + 1)
    want = sorted(fused.items(), key=lambda x: -x[1])[:k]
    assert [(h.id, h.score) for h in hybrid] == want  # RRF exactly, as before
    assert store.search(q, "skill", k=k, reranker=None) == hybrid
    # With a reranker: its best of the fused top rerank_depth, its score on each hit.
    deep = store.search(q, "skill", k=12)
    ranked = store.search(q, "skill", k=3, reranker=_ByLength(), rerank_depth=12)
    assert [h.id for h in ranked] == [h.id for h in sorted(deep, key=lambda h: len(h.text))[:3]]
    assert [h.score for h in ranked] == [-float(len(h.text)) for h in ranked]
    by_id = {h.id: h for h in deep}
    assert all(h.dense_score == by_id[h.id].dense_score for h in ranked)
    store.reranker = _ByLength()  # the store's own reranker is the default
    assert store.search(q, "skill", k=3, rerank_depth=12) == ranked


def test_a_reranker_that_breaks_the_contract_is_a_clear_error(store: ExperienceStore) -> None:
    class Short:
        def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
            return np.zeros(len(texts) - 1)

    _fill(store, 10)
    with pytest.raises(StoreError, match="one finite score per text") as e:
        store.search("apple", "skill", k=3, reranker=Short())
    one_line_error(e)


# --------------------------------------------------------------------------- the Reranker protocol


def _tiny_cross_encoder(out: Path) -> Path:
    """A 1-layer BERT cross-encoder with random (seeded) weights, saved as a user's checkpoint is."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from evolve.stores.embedders import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# One factory per implementation; a new Reranker class must be added here (a test checks that).
RERANKERS: dict[str, Callable[[Path], Reranker]] = {
    "EmbeddingReranker": lambda _: EmbeddingReranker(HashingEmbedder(128)),
    "CrossEncoderReranker": lambda tmp: CrossEncoderReranker(_tiny_cross_encoder(tmp / "ce")),
}
RERANK_TEXTS = [
    "take the red key from the table",
    "open the fridge in the kitchen",
    "Ünïcödé text with émojis 🙂",
    "",
    "word " * 2000,  # longer than any model's window
]


def test_every_reranker_is_covered() -> None:
    from evolve.stores import hybrid

    classes = {
        name
        for name, obj in inspect.getmembers(hybrid, inspect.isclass)
        if obj.__module__ == hybrid.__name__ and obj is not Reranker and callable(getattr(obj, "score", None))
    }
    assert classes == set(RERANKERS)


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_reranker_conforms_to_the_protocol(name: str, tmp_path: Path) -> None:
    r = RERANKERS[name](tmp_path)
    assert isinstance(r, Reranker)
    q = "find the key"
    s = r.score(q, RERANK_TEXTS)
    assert isinstance(s, np.ndarray) and s.shape == (len(RERANK_TEXTS),)
    assert np.issubdtype(s.dtype, np.floating) and np.isfinite(s).all()
    np.testing.assert_array_equal(r.score(q, RERANK_TEXTS), s)  # deterministic
    one_by_one = np.array([r.score(q, [t])[0] for t in RERANK_TEXTS])
    np.testing.assert_allclose(one_by_one, s, rtol=1e-4, atol=1e-4)  # independent of batching
    perm = [3, 0, 4, 2, 1]
    np.testing.assert_allclose(r.score(q, [RERANK_TEXTS[i] for i in perm]), s[perm], rtol=1e-4, atol=1e-4)
    assert r.score(q, []).shape == (0,)
    assert len({round(float(x), 6) for x in s}) > 1  # it tells texts apart
    # And the store accepts it.
    with open_store(tmp_path / "s.duckdb") as st:
        _fill(st, 10)
        hits = st.search("take the red key", "skill", k=3, reranker=r)
        assert len(hits) == 3 and hits == sorted(hits, key=lambda h: -h.score)
