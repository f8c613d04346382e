"""``RawTrajectoryMemory``: the static-retrieval baseline that Steve-Evolving is compared against.

It keeps past *successful* trajectories verbatim (no abstraction, no guardrails, no learning
from failures) and, like exemplar-based agents (Synapse, ExpeL's trajectory retrieval):

* at episode start ranks them by similarity of goal + first observation (dense + keyword);
* at every step aligns the current observation with each retrieved trajectory (most similar
  step at or after the last aligned one) and injects an excerpt of what was done from there
  (``MemoryContext.examples``) for LLM planners;
* for planners that cannot read (random, heuristic), proposes the retrieved trajectories' next
  actions as replays: the first one that is admissible now, looking a few actions ahead, from
  the most similar trajectory first.

To be fair to it, it gets the same episodic hygiene as EvolveMemory's proposals: a replayed
action that failed in a state is not replayed there again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from evolve.diagnose import diff_states, state_key
from evolve.schema import (
    Action,
    ActionSource,
    Diagnosis,
    GuardrailVerdict,
    MemoryContext,
    Observation,
    RetrievalLog,
    Step,
    Task,
    Trajectory,
)
from evolve.stores.embedders import Embedder, make_embedder
from evolve.stores.keyword import BM25Index
from evolve.text import normalise as norm


@dataclass(frozen=True)
class TrajectoryRecord:
    """The part of a trajectory the baseline keeps (small and picklable)."""

    id: str
    goal: str
    first_obs: str
    actions: tuple[str, ...]
    observations: tuple[str, ...]
    """Pre-step observation text of each action (truncated)."""
    outcome: str
    score: float

    @classmethod
    def of(cls, t: Trajectory, obs_chars: int = 400) -> TrajectoryRecord:
        return cls(
            id=t.id,
            goal=t.goal,
            first_obs=t.steps[0].pre_state.text[:obs_chars] if t.steps else "",
            actions=tuple(s.action.text for s in t.steps),
            observations=tuple(s.pre_state.text[:obs_chars] for s in t.steps),
            outcome=t.outcome.value,
            score=t.score,
        )


def select_trajectories(trajs: Sequence[Trajectory], successes_only: bool = True) -> list[Trajectory]:
    """Successful trajectories (or, when there are none, those that scored), with steps."""
    good = [t for t in trajs if t.success and t.steps]
    if good or successes_only:
        return good
    return [t for t in trajs if t.score > 0 and t.steps]


@dataclass
class _Ep:
    goal: str = ""
    top: list[int] = field(default_factory=list)
    sims: list[float] = field(default_factory=list)
    query: str = ""
    """The text the trajectories were ranked for (goal + first observation)."""
    others: list[tuple[int, float]] = field(default_factory=list)
    """Ranked candidates below the top k (record index, similarity), logged once, not injected."""
    cursor: dict[int, int] = field(default_factory=dict)
    banned: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    synced: int = 0
    logs: list[RetrievalLog] = field(default_factory=list)
    proposed: int = 0
    obs_vec: tuple[str, object] | None = None
    """(observation text, its embedding): one embedding per step, shared by retrieve and propose."""


class RawTrajectoryMemory:
    """AgentHooks retrieving raw past trajectories (see the module docstring)."""

    def __init__(
        self,
        trajectories: Sequence[Trajectory | TrajectoryRecord],
        *,
        embedder: str | Embedder | None = "hash",
        k: int = 3,
        lookahead: int = 3,
        propose: bool = True,
        excerpt_steps: int = 5,
        namespace: str = "default",
        log_top: int = 10,
    ) -> None:
        recs = [r if isinstance(r, TrajectoryRecord) else TrajectoryRecord.of(r) for r in trajectories]
        self.records = [r for r in recs if r.actions]
        self.k = k
        self.lookahead = lookahead
        self.propose_actions = propose
        self.excerpt_steps = excerpt_steps
        self.namespace = namespace
        self.log_top = log_top
        """Ranked trajectories logged per episode (the top ``k`` are logged at every step)."""
        self.embedder = make_embedder(embedder) if isinstance(embedder, str) or embedder is None else embedder
        docs = [f"{r.goal}\n{r.first_obs}" for r in self.records]
        self._doc_vecs = self.embedder.embed(docs) if docs else np.zeros((0, 1))
        self._bm25 = BM25Index(docs) if docs else None
        # Step-level vectors for alignment, per record.
        self._step_vecs = [self.embedder.embed(list(r.observations)) for r in self.records]
        self._logs: list[RetrievalLog] = []
        self._ep = _Ep()

    @classmethod
    def factory(
        cls,
        trajectories: Sequence[Trajectory],
        embedder: str = "hash",
        successes_only: bool = True,
        **kwargs: object,
    ) -> RawMemoryFactory:
        """A picklable zero-arg callable; only compact records of the chosen trajectories travel."""
        recs = tuple(TrajectoryRecord.of(t) for t in select_trajectories(trajectories, successes_only))
        return RawMemoryFactory(recs, embedder, dict(kwargs))

    # ------------------------------------------------------------------ hooks

    def on_episode_start(self, task: Task, obs: Observation) -> None:
        self._ep = _Ep(goal=task.goal or obs.goal)
        if not self.records:
            return
        q = f"{self._ep.goal}\n{obs.text[:400]}"
        dense = np.clip(self._doc_vecs @ self.embedder.embed([q])[0], 0, 1)
        kw = self._bm25.scores(q) if self._bm25 is not None else np.zeros(len(self.records))
        if kw.max() > 0:
            kw = kw / kw.max()
        sims = 0.7 * dense + 0.3 * kw
        ranked = [int(i) for i in np.argsort(-sims, kind="stable")[: max(self.k, self.log_top)]]
        top = ranked[: self.k]
        self._ep.query = q
        self._ep.top = top
        self._ep.sims = [float(sims[i]) for i in top]
        self._ep.others = [(i, float(sims[i])) for i in ranked[self.k : self.log_top]]
        self._ep.cursor = {i: 0 for i in top}

    def _sync(self, history: list[Step]) -> None:
        ep = self._ep
        for s in history[ep.synced :]:
            unchanged = diff_states(s.pre_state.state, s.post_state.state).empty
            if unchanged or (s.diagnosis is not None and s.diagnosis.failed and unchanged):
                ep.banned[state_key(s.pre_state)].add(norm(s.action.text))
            # A replayed action that worked moves that trajectory's cursor past it.
            for i in ep.top:
                acts = self.records[i].actions
                c = ep.cursor[i]
                for j in range(c, min(len(acts), c + self.lookahead + 1)):
                    if norm(acts[j]) == norm(s.action.text) and not unchanged:
                        ep.cursor[i] = j + 1
                        break
        ep.synced = len(history)

    def _align(self, i: int, obs: Observation) -> int:
        """Position in record ``i`` that best matches ``obs``, not before its cursor."""
        ep = self._ep
        c = ep.cursor.get(i, 0)
        vecs = self._step_vecs[i]
        if c >= len(vecs):
            return c
        text = obs.text[:400]
        if ep.obs_vec is None or ep.obs_vec[0] != text:
            ep.obs_vec = (text, self.embedder.embed([text])[0])
        sims = vecs[c:] @ ep.obs_vec[1]
        # Prefer the cursor itself unless a later step is clearly more similar.
        j = int(np.argmax(sims))
        return c + j if sims[j] > sims[0] + 0.1 else c

    def retrieve(self, obs: Observation, history: list[Step]) -> MemoryContext:
        self._sync(history)
        ep = self._ep
        examples = []
        for rank, i in enumerate(ep.top):
            r = self.records[i]
            pos = self._align(i, obs)
            nxt = r.actions[pos : pos + self.excerpt_steps]
            done = " -> ".join(r.actions[max(0, pos - 2) : pos])
            examples.append(
                f"Past episode ({r.outcome}, score {r.score:g}) with goal '{r.goal[:200]}': "
                + (f"... {done} -> " if done else "")
                + (" -> ".join(nxt) if nxt else "(end)")
            )
            ep.logs.append(
                self._log(len(history), r.id, rank, ep.sims[rank], bool(nxt), True, f"aligned at step {pos}")
            )
        # The candidates that did not make the top k: once per episode (their scores never change).
        for rank, (i, sim) in enumerate(ep.others, start=len(ep.top)):
            ep.logs.append(
                self._log(
                    len(history), self.records[i].id, rank, sim, True, False, f"not in the top {self.k}"
                )
            )
        ep.others = []
        return MemoryContext(examples=examples)

    def _log(
        self, step: int, record_id: str, rank: int, sim: float, applicable: bool, injected: bool, reason: str
    ) -> RetrievalLog:
        return RetrievalLog(
            namespace=self.namespace,
            trajectory_id="",
            step_index=step,
            knowledge_id=record_id,
            kind="trajectory",
            score=sim,
            applicable=applicable,
            injected=injected,
            reason=reason,
            query=self._ep.query,
            rank=rank,
            similarity=sim,
        )

    def propose(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Action | None:
        if not self.propose_actions or obs.admissible_actions is None:
            return None
        ep = self._ep
        admissible = {norm(a): a for a in obs.admissible_actions}
        banned = ep.banned.get(state_key(obs), set())
        for i in ep.top:
            r = self.records[i]
            pos = self._align(i, obs)
            for j in range(pos, min(len(r.actions), pos + self.lookahead)):
                a = norm(r.actions[j])
                if a in admissible and a not in banned:
                    ep.proposed += 1
                    return Action(
                        text=admissible[a],
                        thought=f"replay step {j} of past episode {r.id}",
                        source=ActionSource.skill,
                    )
        return None

    def check_action(self, action: Action, obs: Observation, memory: MemoryContext) -> GuardrailVerdict:
        return GuardrailVerdict()

    def diagnose(self, step: Step, history: list[Step]) -> Diagnosis | None:
        return None

    def on_episode_end(self, traj: Trajectory) -> None:
        ep = self._ep
        for r in ep.logs:
            r.trajectory_id = traj.id
            r.outcome = traj.outcome.value
        self._logs.extend(ep.logs)
        traj.metadata["raw_memory"] = {
            "retrieved": [self.records[i].id for i in ep.top],
            "proposed": ep.proposed,
        }
        self._ep = _Ep()

    def pop_retrieval_logs(self) -> list[RetrievalLog]:
        out, self._logs = self._logs, []
        return out


@dataclass(frozen=True)
class RawMemoryFactory:
    records: tuple[TrajectoryRecord, ...]
    embedder: str = "hash"
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> RawTrajectoryMemory:
        return RawTrajectoryMemory(list(self.records), embedder=self.embedder, **self.kwargs)  # type: ignore[arg-type]
