"""Reranker training data from the store: queries, candidates, outcome labels and teacher soft labels.

A *retrieval decision* is one step's ranked candidates of one kind, read back from the retrieval
logs: the query is the agent's goal + observation at that step, the candidates are the knowledge
items the hybrid search returned (their texts looked up in the store).

Labels come from two places (MemReranker, Margin-MSE distillation):

* **Outcomes** (:func:`outcome_labels`): the candidate would have done what the step did (its bound
  action is the step's action, or it was executed) -> 1 when that step made progress (the diagnosis'
  score progress, or a state change without failure in an episode that was won), 0 when the step
  failed; 0 when it did not apply in that state or the store retired it; 0 when an oracle (gold)
  step that helped took another action; unknown otherwise.
* **Teachers**: pairwise votes ``P(a more helpful than b)`` from LLM judges
  (:class:`LLMPairwiseJudge`, any OpenAI-compatible endpoint, both orders to cancel position bias)
  and from the outcomes themselves (:func:`outcome_votes`). Votes from every teacher are pooled per
  query and fitted with a Bradley-Terry model (:func:`bradley_terry`); the strengths become
  pointwise soft labels through one Platt calibration fitted against the outcome labels
  (:func:`platt_fit`), so a teacher's 0.7 means "helps 70% of the time".

:func:`reranker_examples` returns one :class:`~evolve.schema.TrainingExample` (kind ``reranker``)
per decision: ``query``, ``documents``, ``labels`` (outcome where known, else the calibrated teacher
label) and, in ``metadata``, the per-candidate outcome labels, teacher labels, hybrid scores and ids.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from evolve.errors import LLMError
from evolve.schema import ExampleKind, RetrievalLog, TrainingExample, Trajectory
from evolve.stores import ExperienceStore
from evolve.text import normalise as norm

_BINDS = re.compile(r"binds '([^']*)'")
_FAILURE_HINTS = ("not admissible", "does not hold", "not possible")


@dataclass
class Candidate:
    """One retrieved item of a decision, as the retrieval log saw it."""

    knowledge_id: str
    text: str
    rank: int
    similarity: float | None
    score: float
    applicable: bool
    injected: bool
    reason: str
    outcome: str | None


@dataclass
class Decision:
    """One step's retrieval of one kind: the query and its candidates, best (hybrid) first."""

    query: str
    trajectory_id: str
    step_index: int
    kind: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.candidates]


def knowledge_texts(store: ExperienceStore, namespace: str | None = None) -> tuple[dict[str, str], set[str]]:
    """``id -> text`` of every skill and guardrail (any status) and the ids the store retired."""
    texts: dict[str, str] = {}
    retired: set[str] = set()
    for k in [*store.skills(namespace), *store.guardrails(namespace)]:
        texts[k.id] = k.text()
        if str(getattr(k.status, "value", k.status)) == "retired":
            retired.add(k.id)
    return texts, retired


def decisions(
    store: ExperienceStore,
    namespace: str | None = None,
    *,
    kinds: Sequence[str] = ("skill",),
    max_candidates: int = 10,
    trajectory_ids: Iterable[str] | None = None,
    logs: Sequence[RetrievalLog] | None = None,
) -> list[Decision]:
    """Retrieval decisions read from the logs: per (trajectory, step, kind) the top ``max_candidates``.

    Decisions with fewer than two candidates or no query text are left out (nothing to rank).
    """
    texts, _ = knowledge_texts(store, namespace)
    want = set(trajectory_ids) if trajectory_ids is not None else None
    groups: dict[tuple[str, int, str], list[RetrievalLog]] = defaultdict(list)
    for r in logs if logs is not None else store.retrieval_logs(namespace):
        if r.kind not in kinds or not r.query or (want is not None and r.trajectory_id not in want):
            continue
        groups[(r.trajectory_id, r.step_index, r.kind)].append(r)
    out = []
    for (tid, step, kind), rs in groups.items():
        rs.sort(key=lambda r: (r.rank if r.rank is not None else 1_000_000, -r.score))
        cands = [
            Candidate(
                knowledge_id=r.knowledge_id,
                text=texts[r.knowledge_id],
                rank=r.rank if r.rank is not None else i,
                similarity=r.similarity,
                score=r.score,
                applicable=r.applicable,
                injected=r.injected,
                reason=r.reason,
                outcome=r.outcome,
            )
            for i, r in enumerate(rs)
            if r.knowledge_id in texts
        ][:max_candidates]
        if len(cands) >= 2:
            out.append(Decision(rs[0].query, tid, step, kind, cands))
    out.sort(key=lambda d: (d.trajectory_id, d.step_index, d.kind))
    return out


# --------------------------------------------------------------------------- outcome labels


def step_helped(traj: Trajectory, step_index: int) -> float | None:
    """Did the step at ``step_index`` help: 1 (score progress, or a clean state change in a won
    episode), 0 (a failure cause or no effect), None (a change in a lost episode: unknown)."""
    if step_index >= len(traj.steps):
        return None
    s = traj.steps[step_index]
    d = s.diagnosis
    if (d is not None and d.progress > 0) or s.reward > 0:
        return 1.0
    if d is not None and d.causes:
        return 0.0
    pre, post = s.pre_state.state, s.post_state.state
    changed = (pre.location, sorted(pre.inventory), sorted(pre.facts)) != (
        post.location,
        sorted(post.inventory),
        sorted(post.facts),
    )
    if not changed and s.pre_state.text.strip() == s.post_state.text.strip():
        return 0.0
    return 1.0 if traj.success and changed else None


def outcome_labels(
    decision: Decision, traj: Trajectory | None, retired: Collection[str] = ()
) -> list[float | None]:
    """Per candidate: 1/0 from what its action did at that step, 0 when it did not apply or was
    retired, None when the outcome says nothing about it (see the module docstring)."""
    taken, gold = None, False
    if traj is not None and decision.step_index < len(traj.steps):
        act = traj.steps[decision.step_index].action
        taken = norm(act.text)
        gold = str(getattr(act.source, "value", act.source)) == "oracle"
    helped = step_helped(traj, decision.step_index) if traj is not None else None
    out: list[float | None] = []
    for c in decision.candidates:
        m = _BINDS.search(c.reason)
        bound = norm(m.group(1)) if m else None
        executed = "executed" in (c.outcome or "") and bound is not None and bound == taken
        if c.knowledge_id in retired:
            out.append(0.0)
        elif (bound is not None and bound == taken) or executed:
            out.append(helped)
        elif gold and helped == 1.0 and bound is not None:
            out.append(0.0)  # the gold path took another action here, and it helped
        elif not c.applicable and any(h in c.reason for h in _FAILURE_HINTS):
            out.append(0.0)
        else:
            out.append(None)
    return out


# --------------------------------------------------------------------------- teachers


Vote = tuple[int, int, float, float]
"""``(i, j, p, w)``: a teacher says candidate ``i`` beats ``j`` with probability ``p``, weight ``w``."""


class PairwiseJudge(Protocol):
    """A teacher: ``P(a is more helpful than b for query)`` in 0..1 (None when it cannot tell)."""

    name: str

    def prefer(self, query: str, a: str, b: str) -> float | None: ...


JUDGE_SYSTEM = (
    "You rank memories for an agent acting in a text environment. Given the agent's task and current "
    "observation, and two memories (skills or rules learned earlier), say which memory is more useful "
    "for choosing the agent's next action right now. Answer with one letter: A or B."
)


def judge_messages(query: str, a: str, b: str, max_chars: int = 1500) -> list[dict[str, str]]:
    """The judge's prompt: the query first (a server's prompt cache reuses it across pairs)."""
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": f"Agent state:\n{query[-max_chars:]}\n\nMemory A: {a}\nMemory B: {b}\n\n"
            "Which memory is more useful now? Answer A or B.",
        },
    ]


def _ab_probability(text: str, top_tokens: list[str] | None, top_lps: list[float] | None) -> float | None:
    """P(A) from the first answer token's top log-probs when both letters are there, else the text."""
    if top_tokens and top_lps:
        pa = pb = 0.0
        for t, lp in zip(top_tokens, top_lps):
            t = t.strip().upper()
            if t == "A":
                pa += math.exp(lp)
            elif t == "B":
                pb += math.exp(lp)
        if pa + pb > 0:
            return pa / (pa + pb)
    m = re.search(r"\b([AB])\b", text.strip().upper())
    if m is None:
        return None
    return 1.0 if m.group(1) == "A" else 0.0


class LLMPairwiseJudge:
    """An OpenAI-compatible chat model comparing two memories (``evolve.llm.client.ChatClient``).

    Each pair is asked in both orders (A/B then B/A) and the two answers averaged, cancelling the
    position bias small models have; the first answer token's top log-probs give a soft vote when
    the server returns them. A failing call counts as no vote (``errors``), never as a crash.
    """

    def __init__(
        self, client: Any, *, both_orders: bool = True, top_logprobs: int = 5, name: str | None = None
    ):
        self.client = client
        self.both_orders = both_orders
        self.top_logprobs = top_logprobs
        self.name = name or f"llm:{getattr(client, 'model', 'judge')}"
        self.calls = 0
        self.errors = 0

    def _ask(self, query: str, a: str, b: str) -> float | None:
        self.calls += 1
        try:
            res = self.client.complete(
                judge_messages(query, a, b), temperature=0.0, max_tokens=2, top_logprobs=self.top_logprobs
            )
        except LLMError:
            self.errors += 1
            return None
        lp = res.logprobs
        tops = lp.top_tokens[0] if lp is not None and lp.top_tokens else None
        top_lps = lp.top_logprobs[0] if lp is not None and lp.top_logprobs else None
        return _ab_probability(res.text, tops, top_lps)

    def prefer(self, query: str, a: str, b: str) -> float | None:
        p1 = self._ask(query, a, b)
        if not self.both_orders:
            return p1
        p2 = self._ask(query, b, a)
        ps = [p for p in (p1, None if p2 is None else 1.0 - p2) if p is not None]
        return sum(ps) / len(ps) if ps else None


def candidate_pairs(n: int, per_query: int) -> list[tuple[int, int]]:
    """Up to ``per_query`` pairs among ``n`` ranked candidates: neighbours first, then wider gaps
    (adjacent pairs decide an ordering; a chain of them connects the Bradley-Terry graph)."""
    out: list[tuple[int, int]] = []
    for gap in range(1, n):
        for i in range(n - gap):
            if len(out) >= per_query:
                return out
            out.append((i, i + gap))
    return out


def judge_votes(
    judges: Sequence[PairwiseJudge], decision: Decision, per_query: int = 6, weight: float = 1.0
) -> list[Vote]:
    """Every judge's vote on the decision's first ``per_query`` candidate pairs."""
    votes: list[Vote] = []
    texts = decision.texts
    for i, j in candidate_pairs(len(texts), per_query):
        for judge in judges:
            p = judge.prefer(decision.query, texts[i], texts[j])
            if p is not None:
                votes.append((i, j, float(p), weight))
    return votes


def outcome_votes(labels: Sequence[float | None], weight: float = 1.0) -> list[Vote]:
    """Pairwise votes implied by the outcome labels (the outcome statistics as one more teacher)."""
    known = [(i, y) for i, y in enumerate(labels) if y is not None]
    votes: list[Vote] = []
    for a in range(len(known)):
        for b in range(a + 1, len(known)):
            (i, yi), (j, yj) = known[a], known[b]
            if yi != yj:
                votes.append((i, j, 1.0 if yi > yj else 0.0, weight))
    return votes


# --------------------------------------------------------------------------- aggregation


def bradley_terry(n: int, votes: Sequence[Vote], *, l2: float = 0.1, iters: int = 200) -> np.ndarray:
    """Bradley-Terry strengths ``theta`` (``P(i beats j) = sigmoid(theta_i - theta_j)``) from soft,
    weighted pairwise votes, by gradient ascent on the L2-regularised log-likelihood (the prior
    keeps unvoted or unbeaten items finite). Items no vote touches stay at 0."""
    theta = np.zeros(n)
    if not votes:
        return theta
    ij = np.array([(v[0], v[1]) for v in votes], dtype=int)
    p = np.array([v[2] for v in votes], dtype=float)
    w = np.array([v[3] for v in votes], dtype=float)
    lr = 1.0 / (0.25 * max(1.0, float(np.bincount(ij.ravel(), minlength=n).max())) * w.max() + l2)
    for _ in range(iters):
        d = theta[ij[:, 0]] - theta[ij[:, 1]]
        r = w * (p - 1.0 / (1.0 + np.exp(-d)))
        g = -l2 * theta
        np.add.at(g, ij[:, 0], r)
        np.add.at(g, ij[:, 1], -r)
        theta += lr * g
    return theta


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def platt_fit(
    scores: Sequence[float], labels: Sequence[float], *, iters: int = 100, l2: float = 1e-3
) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` with ``sigmoid(a * score + b)`` calibrated to the (soft) labels
    (Newton's method on the log-loss). With one label class only, ``a = 1`` and ``b`` its log-odds."""
    x = np.asarray(scores, dtype=float)
    y = np.clip(np.asarray(labels, dtype=float), 0.0, 1.0)
    if x.size == 0:
        return 1.0, 0.0
    if np.ptp(x) == 0 or y.min() == y.max():
        m = float(np.clip(y.mean(), 0.02, 0.98))
        return 1.0, math.log(m / (1 - m)) - float(x.mean())
    a, b = 1.0, 0.0
    for _ in range(iters):
        q = sigmoid(a * x + b)
        r = q - y
        s = q * (1 - q) + 1e-9
        g = np.array([(r * x).sum() + l2 * a, r.sum()])
        h = np.array([[(s * x * x).sum() + l2, (s * x).sum()], [(s * x).sum(), s.sum() + 1e-9]])
        try:
            step = np.linalg.solve(h, g)
        except np.linalg.LinAlgError:
            break
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(b)


# --------------------------------------------------------------------------- the builder


def reranker_examples(
    store: ExperienceStore,
    namespace: str | None = None,
    *,
    judges: Sequence[PairwiseJudge] = (),
    kinds: Sequence[str] = ("skill",),
    max_candidates: int = 10,
    pairs_per_query: int = 6,
    max_judged: int | None = None,
    trajectory_ids: Iterable[str] | None = None,
    outcome_weight: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[TrainingExample]:
    """One ``reranker`` example per retrieval decision with at least one labelled candidate.

    ``judges`` (LLM teachers) vote on up to ``pairs_per_query`` pairs of the first ``max_judged``
    decisions (all when None); votes and outcome votes are fitted per decision with
    :func:`bradley_terry` and turned into soft labels by one :func:`platt_fit` over all decisions.
    ``labels`` hold the outcome label where known, else that soft label.
    """
    ns = namespace or store.namespace
    _, retired = knowledge_texts(store, ns)
    ds = decisions(store, ns, kinds=kinds, max_candidates=max_candidates, trajectory_ids=trajectory_ids)
    trajs = {t.id: t for t in store.trajectories(ns, ids=sorted({d.trajectory_id for d in ds}))} if ds else {}
    rows: list[tuple[Decision, list[float | None], np.ndarray | None]] = []
    judged = 0
    for n, d in enumerate(ds):
        outcomes = outcome_labels(d, trajs.get(d.trajectory_id), retired)
        votes = outcome_votes(outcomes, outcome_weight)
        teacher = None
        if judges and (max_judged is None or judged < max_judged):
            votes += judge_votes(judges, d, pairs_per_query)
            teacher = bradley_terry(len(d.candidates), votes)
            judged += 1
        elif votes:
            teacher = bradley_terry(len(d.candidates), votes)
        if progress is not None:
            progress(n + 1, len(ds))
        rows.append((d, outcomes, teacher))
    # One Platt calibration of teacher strengths against every known outcome.
    xs = [float(t[i]) for _, o, t in rows if t is not None for i, y in enumerate(o) if y is not None]
    ys = [float(y) for _, o, t in rows if t is not None for y in o if y is not None]
    a, b = platt_fit(xs, ys) if xs else (1.0, 0.0)
    out: list[TrainingExample] = []
    for d, outcomes, teacher in rows:
        tr = trajs.get(d.trajectory_id)
        soft = [float(sigmoid(a * x + b)) for x in teacher] if teacher is not None else [None] * len(outcomes)
        keep = [
            i for i, (y, s) in enumerate(zip(outcomes, soft)) if y is not None or (s is not None and judges)
        ]
        if not keep:
            continue
        c = d.candidates
        out.append(
            TrainingExample(
                namespace=ns,
                kind=ExampleKind.reranker,
                query=d.query,
                documents=[c[i].text for i in keep],
                labels=[float(outcomes[i]) if outcomes[i] is not None else float(soft[i]) for i in keep],  # type: ignore[arg-type]
                provenance=[d.trajectory_id],
                metadata={
                    "task_id": tr.task_id if tr is not None else None,
                    "step_index": d.step_index,
                    "kind": d.kind,
                    "knowledge_ids": [c[i].knowledge_id for i in keep],
                    "outcome_labels": [outcomes[i] for i in keep],
                    "teacher_labels": [soft[i] for i in keep],
                    "similarity": [c[i].similarity for i in keep],
                    "memory_score": [c[i].score for i in keep],
                    "hybrid_rank": [c[i].rank for i in keep],
                    "teachers": [j.name for j in judges] + ["outcomes"],
                    "platt": [a, b],
                },
            )
        )
    return out


__all__ = [
    "Candidate",
    "Decision",
    "LLMPairwiseJudge",
    "PairwiseJudge",
    "bradley_terry",
    "candidate_pairs",
    "decisions",
    "judge_messages",
    "judge_votes",
    "knowledge_texts",
    "outcome_labels",
    "outcome_votes",
    "platt_fit",
    "reranker_examples",
    "sigmoid",
    "step_helped",
]
