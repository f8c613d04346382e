"""The distilled memory reranker: labels from outcomes and teacher votes, sentence-transformers
training of a tiny cross-encoder, calibration, and retrieve -> rerank -> threshold in the loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from test_skills import NAMES, ChestWorld

from evolve.schema import (
    Action,
    ActionSource,
    ExampleKind,
    KnowledgeStatus,
    Skill,
    Split,
    Step,
    TrainingExample,
)
from evolve.skills import EvolveMemory
from evolve.skills.memory import MemoryConfig
from evolve.stores import ExperienceStore, HashingEmbedder
from evolve.stores.hybrid import (
    CALIBRATION_FILE,
    CrossEncoderReranker,
    EmbeddingReranker,
    Reranker,
    make_reranker,
    rerank,
    reranker_query,
)
from evolve.synth.reranker_data import (
    LLMPairwiseJudge,
    bradley_terry,
    candidate_pairs,
    outcome_votes,
    platt_fit,
    reranker_examples,
    sigmoid,
)
from evolve.train.reranker import (
    RerankerError,
    RerankerSettings,
    average_precision,
    expected_calibration_error,
    ndcg_at_k,
    recall_threshold,
    train_reranker,
)

UNLOCK = Skill(
    name="unlock {obj1} with {obj2}",
    steps=["unlock {obj1} with {obj2}"],
    preconditions=["locked({obj1})", "in({obj2}, I)", "match({obj2}, {obj1})", "at({obj1}, {room})"],
    verification=["not locked({obj1})"],
    tags=["atomic", "cue:unlock"],
    status=KnowledgeStatus.active,
)
MACRO = Skill(
    name="unlock then open",
    steps=["unlock {obj1} with {obj2}", "open {obj1}"],
    preconditions=["locked({obj1})", "in({obj2}, I)", "match({obj2}, {obj1})"],
    verification=["open({obj1})"],
    tags=["macro", "cue:unlock", "cue:open"],
    status=KnowledgeStatus.active,
)


def tiny_cross_encoder(out: Path, seed: int = 0) -> Path:
    """A 1-layer BERT (random, seeded) with MiniLM's tokenizer, saved as a user's checkpoint is."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from evolve.stores.embedders import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cross_encoder(tmp_path_factory.mktemp("tiny_ce"))


# --------------------------------------------------------------------------- aggregation + metrics


def test_bradley_terry_recovers_the_order_and_platt_calibrates() -> None:
    # Teachers agree that 0 > 1 > 2 > 3, one dissents softly on (1, 2).
    votes = [(0, 1, 0.9, 1.0), (1, 2, 0.8, 1.0), (2, 3, 0.9, 1.0), (1, 2, 0.4, 0.5), (0, 3, 1.0, 1.0)]
    theta = bradley_terry(4, votes)
    assert list(np.argsort(-theta)) == [0, 1, 2, 3] and np.isfinite(theta).all()
    assert bradley_terry(3, []).tolist() == [0.0, 0.0, 0.0]
    # Unanimous votes stay finite (the prior), and a reversed vote reverses the order.
    assert np.isfinite(bradley_terry(2, [(0, 1, 1.0, 1.0)] * 50)).all()
    assert bradley_terry(2, [(0, 1, 0.0, 1.0)])[1] > 0
    # Platt: labels drawn from sigmoid(2x - 1) give back a ~ 2, b ~ -1.
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < sigmoid(2 * x - 1)).astype(float)
    a, b = platt_fit(x.tolist(), y.tolist())
    assert a == pytest.approx(2.0, abs=0.25) and b == pytest.approx(-1.0, abs=0.2)
    assert platt_fit([0.3, 0.3], [1.0, 1.0])[0] == 1.0  # degenerate input: no crash
    # Outcome votes: one per pair of differently labelled candidates.
    assert outcome_votes([1.0, None, 0.0, 0.0]) == [(0, 2, 1.0, 1.0), (0, 3, 1.0, 1.0)]
    assert candidate_pairs(4, 4) == [(0, 1), (1, 2), (2, 3), (0, 2)]


def test_recall_threshold() -> None:
    assert recall_threshold([0.9, 0.4, 0.3, 0.2], recall=0.75) == pytest.approx(0.275)
    assert recall_threshold([0.9, 0.95], recall=0.9) == 0.5  # capped
    assert recall_threshold([]) == 0.5


def test_ranking_metrics() -> None:
    assert ndcg_at_k([0.9, 0.1, 0.5], [1, 0, 0]) == 1.0
    assert ndcg_at_k([0.1, 0.9, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert average_precision([0.1, 0.9, 0.5], [1, 0, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert expected_calibration_error([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 0]) == pytest.approx(0.1)
    assert expected_calibration_error([0.5, 0.5], [1, 0]) == 0.0


def test_reranker_query_keeps_the_goal_and_the_latest_observation() -> None:
    goal = "Go north, then take the ladle from the chair."
    obs = "-= Kitchen =-\n" + "There is a table here. " * 80 + "An exit leads north."
    q = reranker_query(f"{goal}\n{goal}\n\n{obs}")
    assert q.count("take the ladle") == 1 and q.startswith(goal) and q.endswith("An exit leads north.")
    assert len(q) <= 200 + 450 + 5


# --------------------------------------------------------------------------- teachers


def test_llm_judge_votes_in_both_orders_over_the_protocol(chat_peer: Callable[..., object]) -> None:
    from evolve.llm.client import ChatClient

    # A position-biased judge (always "A") cancels out; a consistent one wins both orders.
    peer = chat_peer([(200, "A")])
    j = LLMPairwiseJudge(ChatClient("peer-model", base_url=peer.url, max_retries=0))  # type: ignore[attr-defined]
    assert j.prefer("q", "x", "y") == pytest.approx(0.5) and j.calls == 2
    peer2 = chat_peer([(200, "A"), (200, "B")])
    j2 = LLMPairwiseJudge(ChatClient("peer-model", base_url=peer2.url, max_retries=0))  # type: ignore[attr-defined]
    assert j2.prefer("find the key", "take key", "eat apple") == 1.0
    sent = peer2.requests[0]["messages"][-1]["content"]  # type: ignore[attr-defined]
    assert "find the key" in sent and "Memory A: take key" in sent
    assert peer2.requests[1]["messages"][-1]["content"].index("eat apple") < peer2.requests[1]["messages"][
        -1
    ][  # type: ignore[attr-defined]
        "content"
    ].index("take key")
    # A failing endpoint is no vote, not a crash.
    bad = chat_peer([(500, "boom")])
    j3 = LLMPairwiseJudge(ChatClient("peer-model", base_url=bad.url, max_retries=0))  # type: ignore[attr-defined]
    assert j3.prefer("q", "a", "b") is None and j3.errors == 2


# --------------------------------------------------------------------------- data from a real store


def _episodes(store: ExperienceStore, reranker: Reranker | None = None) -> None:
    """ChestWorld episodes with EvolveMemory retrieving, recorded in ``store``: an oracle acting
    (propose off) and the memory acting (propose on)."""
    from evolve.agents.graph import run_episode
    from evolve.agents.policies import make_policy

    env = ChestWorld()
    for i, task in enumerate(env.tasks("test")):
        for policy, propose in (
            (make_policy({"kind": "oracle"}), False),
            (make_policy({"kind": "random", "seed": i}), True),
        ):
            mem = EvolveMemory([UNLOCK, MACRO], config=MemoryConfig(propose=propose), reranker=reranker)
            traj = run_episode(env, policy, task, hooks=mem, max_steps=8)
            store.add_trajectories([traj])
            mem.flush(store)


@pytest.fixture(scope="module")
def chest_store(tmp_path_factory: pytest.TempPathFactory) -> ExperienceStore:
    store = ExperienceStore(tmp_path_factory.mktemp("chest") / "s.duckdb", embedder=HashingEmbedder(64))
    store.upsert_skills([UNLOCK, MACRO])
    _episodes(store)
    return store


def test_examples_from_retrieval_logs_and_outcomes(chest_store: ExperienceStore) -> None:
    exs = reranker_examples(chest_store)
    assert exs and all(e.kind == ExampleKind.reranker and e.query for e in exs)
    labels = [y for e in exs for y in e.labels]
    assert 1.0 in labels and 0.0 in labels
    trajs = {t.id: t for t in chest_store.trajectories()}
    for e in exs:
        t = trajs[e.provenance[0]]
        step = t.steps[e.metadata["step_index"]]
        assert e.metadata["task_id"] == t.task_id and len(e.documents) == len(e.labels)
        for kid, y in zip(e.metadata["knowledge_ids"], e.labels):
            sk = next(s for s in (UNLOCK, MACRO) if s.id == kid)
            assert e.documents[e.metadata["knowledge_ids"].index(kid)] == sk.text()
            if y == 1.0:
                # A positive would have done what that step did, and the step helped.
                assert step.action.text.startswith("unlock") and step.post_state.state != step.pre_state.state
    # The retired item is labelled 0 wherever it was retrieved.
    chest_store.upsert_skills([MACRO.model_copy(update={"status": KnowledgeStatus.retired})])
    try:
        for e in reranker_examples(chest_store):
            for kid, y in zip(e.metadata["knowledge_ids"], e.labels):
                assert kid != MACRO.id or y == 0.0
    finally:
        chest_store.upsert_skills([MACRO])


def test_teacher_votes_become_calibrated_soft_labels(chest_store: ExperienceStore) -> None:
    class PrefersShort:
        name = "short"
        calls = 0

        def prefer(self, query: str, a: str, b: str) -> float:
            self.calls += 1
            return 0.9 if len(a) < len(b) else 0.1

    judge = PrefersShort()
    exs = reranker_examples(chest_store, judges=[judge], max_judged=3)
    assert judge.calls > 0 and all(e.metadata["teachers"] == ["short", "outcomes"] for e in exs)
    soft = [x for e in exs for x in e.metadata["teacher_labels"] if x is not None]
    assert soft and all(0.0 < x < 1.0 for x in soft)
    a, _ = exs[0].metadata["platt"]
    assert np.isfinite(a)
    # Where the outcome is known it wins; elsewhere the label is the calibrated teacher's.
    for e in exs:
        for y, o, t in zip(e.labels, e.metadata["outcome_labels"], e.metadata["teacher_labels"]):
            assert y == (o if o is not None else t)


# --------------------------------------------------------------------------- training


def _separable(n: int) -> list[TrainingExample]:
    """Decisions where 'open' memories helped and 'eat' ones did not, while the logged hybrid
    score prefers the 'eat' ones: a student has to learn from the labels to beat it."""
    out = []
    for i in range(n):
        out.append(
            TrainingExample(
                kind=ExampleKind.reranker,
                query=f"You are in room {i}. There is a closed chest here. Goal: get the coin {i}.",
                documents=[
                    f"open the chest {i}",
                    f"eat the apple {i}",
                    f"open the box {i}",
                    f"eat the bread {i}",
                ],
                labels=[1.0, 0.0, 1.0, 0.0],
                provenance=[f"traj-{i}"],
                metadata={"task_id": f"task-{i}", "similarity": [0.2, 0.9, 0.1, 0.8]},
            )
        )
    return out


def test_train_reranker_learns_calibrates_and_plugs_into_memory(tiny_ce: Path, tmp_path: Path) -> None:
    store = ExperienceStore(tmp_path / "s.duckdb", embedder=HashingEmbedder(64))
    settings = RerankerSettings(
        base_model=str(tiny_ce), out_dir=str(tmp_path / "rr"), losses=["bce", "margin_mse", "lambda", "mnrl"],
        max_steps=100, batch_size=8, learning_rate=2e-3, max_length=64, holdout=0.3, num_threads=1,
    )  # fmt: skip
    res = train_reranker(store, settings, examples=_separable(40))
    assert set(res.losses) == {"bce", "margin_mse", "lambda", "mnrl"} and res.holdout_queries > 0
    assert res.train_rows["mnrl"] > 0  # hard negatives mined by sentence-transformers
    # Held-out tasks: the student ranks what helped first; the logged hybrid order does not.
    st, hy = res.metrics["student"], res.metrics["hybrid"]
    assert st.ndcg_at_10 > 0.95 and st.ndcg_at_10 > hy.ndcg_at_10 + 0.2
    assert st.ece is not None and st.ece < 0.25
    # Calibrated scores: one threshold splits helpful from unhelpful memories.
    rr = make_reranker(res.model_dir)
    assert isinstance(rr, CrossEncoderReranker) and rr.calibration == res.calibration
    assert rr.threshold == res.threshold and 0.0 < res.threshold <= 0.5
    assert (Path(res.model_dir) / CALIBRATION_FILE).exists()
    s = rr.score(
        "You are in room 99. There is a closed chest here. Goal: get the coin 99.",
        ["open the chest 99", "eat the apple 99"],
    )
    assert s[0] > rr.threshold > s[1]


def test_train_reranker_refuses_an_empty_store(tmp_path: Path, tiny_ce: Path) -> None:
    store = ExperienceStore(tmp_path / "s.duckdb", embedder=HashingEmbedder(64))
    with pytest.raises(RerankerError, match="no labelled retrieval decisions"):
        train_reranker(store, {"base_model": str(tiny_ce), "out_dir": str(tmp_path / "rr")})
    with pytest.raises(RerankerError, match="does not exist"):
        train_reranker(store, {"base_model": str(tmp_path / "nope")})
    with pytest.raises(ValueError):
        RerankerSettings(losses=["focal"])  # type: ignore[list-item]


# --------------------------------------------------------------------------- in the loop


class Fixed:
    """A deterministic reranker: texts containing ``good`` score 0.9, others 0.1."""

    threshold = 0.5

    def __init__(self, good: str) -> None:
        self.good = good

    def score(self, query: str, texts: Sequence[str]) -> np.ndarray:
        return np.array([0.9 if self.good in t else 0.1 for t in texts])


def _after_take(mem: EvolveMemory):
    env = ChestWorld()
    task = env.tasks("test")[0]
    k = NAMES[Split.test][0][0]
    obs0 = env.reset(task)
    mem.on_episode_start(task, obs0)
    obs1 = env.step(f"take {k}")
    history = [Step(index=0, pre_state=obs0, action=Action(text=f"take {k}"), post_state=obs1)]
    return obs1, history


def test_memory_retrieves_reranks_thresholds_and_logs_scores() -> None:
    plain = EvolveMemory([UNLOCK, MACRO])
    obs, hist = _after_take(plain)
    assert {s.id for s in plain.retrieve(obs, hist).skills} == {UNLOCK.id, MACRO.id}
    # The reranker says only the macro helps here: the atomic skill is filtered out.
    mem = EvolveMemory([UNLOCK, MACRO], reranker=Fixed("then open"))
    obs, hist = _after_take(mem)
    ctx = mem.retrieve(obs, hist)
    assert [s.id for s in ctx.skills] == [MACRO.id]
    logs = {r.knowledge_id: r for r in mem._ep.logs if r.kind == "skill"}
    assert logs[MACRO.id].rerank_score == pytest.approx(0.9) and logs[MACRO.id].injected
    assert logs[UNLOCK.id].rerank_score == pytest.approx(0.1) and not logs[UNLOCK.id].injected
    assert "reranker 0.10 < 0.50" in logs[UNLOCK.id].reason and not logs[UNLOCK.id].applicable
    act = mem.propose(obs, hist, ctx)
    assert act is not None and act.skill_id == MACRO.id and act.source == ActionSource.skill
    # The config's threshold overrides the reranker's; a low one lets both through.
    low = EvolveMemory(
        [UNLOCK, MACRO], reranker=Fixed("then open"), config=MemoryConfig(rerank_threshold=0.05)
    )
    obs, hist = _after_take(low)
    assert {s.id for s in low.retrieve(obs, hist).skills} == {UNLOCK.id, MACRO.id}
    # Swappable: the picklable factory carries a spec, built in the worker.
    f = EvolveMemory.factory([UNLOCK], reranker="embedding:hash:64")
    assert isinstance(f().index.reranker, EmbeddingReranker)
    assert EvolveMemory([UNLOCK]).index.reranker is None


def test_langgraph_store_search_uses_the_reranker(tmp_path: Path) -> None:
    from evolve.stores.langgraph_store import EvolveStore

    index = {"embed": HashingEmbedder(64), "dims": 64, "fields": ["text"]}
    plain = EvolveStore(path=tmp_path / "a.duckdb", index=index)
    ranked = EvolveStore(path=tmp_path / "b.duckdb", index=index, reranker=Fixed("chest"))
    texts = ["take the red key", "open the red chest", "eat the red apple", "go north"]
    for st in (plain, ranked):
        for i, t in enumerate(texts):
            st.put(("mem",), f"k{i}", {"text": t})
    q = "the red key"
    assert plain.search(("mem",), query=q, limit=1)[0].key == "k0"
    hits = ranked.search(("mem",), query=q, limit=2)
    assert hits[0].key == "k1" and hits[0].score == pytest.approx(0.9) and len(hits) == 2
    assert [h.key for h in ranked.search(("mem",), limit=4)] == [
        h.key for h in plain.search(("mem",), limit=4)
    ]
    plain.close()
    ranked.close()


# --------------------------------------------------------------------------- conformance


def _trained(tiny: Path, out: Path) -> CrossEncoderReranker:
    import shutil

    shutil.copytree(tiny, out)
    (out / CALIBRATION_FILE).write_text('{"a": 0.5, "b": -0.2, "threshold": 0.4}')
    return CrossEncoderReranker(out)


# One factory per Reranker implementation (tests/test_store.py keeps the list of classes honest).
RERANKERS: dict[str, Callable[[Path, Path], Reranker]] = {
    "EmbeddingReranker": lambda _t, _o: EmbeddingReranker(HashingEmbedder(128)),
    "CrossEncoderReranker": lambda t, _o: CrossEncoderReranker(t),
    "CrossEncoderReranker(calibrated)": lambda t, o: _trained(t, o / "cal"),
    "Fixed": lambda _t, _o: Fixed("key"),
}
TEXTS = ["take the red key", "open the fridge", "Ünïcödé 🙂", "", "word " * 2000]


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_every_reranker_conforms(name: str, tiny_ce: Path, tmp_path: Path) -> None:
    r = RERANKERS[name](tiny_ce, tmp_path)
    assert isinstance(r, Reranker)
    q = "find the key\n" + "long observation " * 300
    s = rerank(r, q, TEXTS)
    assert s.shape == (len(TEXTS),) and np.isfinite(s).all()
    np.testing.assert_array_equal(rerank(r, q, TEXTS), s)  # deterministic
    one = np.array([rerank(r, q, [t])[0] for t in TEXTS])
    np.testing.assert_allclose(one, s, rtol=1e-4, atol=1e-4)  # independent of batching
    assert rerank(r, q, []).shape == (0,)
    if isinstance(r, CrossEncoderReranker) and r.calibration is not None:
        assert ((s > 0) & (s < 1)).all() and r.threshold == 0.4  # probabilities, one threshold
    # In the loop: the memory logs its scores.
    mem = EvolveMemory([UNLOCK, MACRO], reranker=r)
    obs, hist = _after_take(mem)
    mem.retrieve(obs, hist)
    assert all(x.rerank_score is not None for x in mem._ep.logs if x.kind == "skill")
