"""``EvolveMemory``: skills and guardrails in the agent loop (the closed-loop control of Steve-Evolving).

Per step it

* **retrieves** the skills whose preconditions hold and whose bound next step serves a pending
  sentence of the goal, and the guardrails whose trigger holds, and hands them to the planner
  (``MemoryContext``) with replanning notes;
* **proposes** a skill's next step as an executable macro action when the skill applies with a high
  score and its bound step is admissible, tracking the macro across steps and abandoning it when a
  step fails;
* **enforces** guardrails before an action runs (regex full match, trigger, scope), plus an
  episodic guard against repeating an action that already failed or looped in the same state;
* **replans locally** on diagnosis events: a failed macro step, a loop or stagnation, or a goal
  sentence that made no progress for a while.

At episode end it updates usage stats (uses / successes / failures per knowledge id), finishes
the retrieval logs with the outcome, and leaves a summary in ``trajectory.metadata["evolve"]``.

Worker processes get a picklable :class:`EvolveMemoryFactory` (knowledge models plus an embedder
*spec* string), never a live embedder.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from evolve.diagnose import diff_states, state_key
from evolve.schema import (
    Action,
    ActionSource,
    Diagnosis,
    FailureCause,
    Guardrail,
    GuardrailVerdict,
    Knowledge,
    KnowledgeStatus,
    MemoryContext,
    Observation,
    Outcome,
    RetrievalLog,
    Skill,
    Step,
    Task,
    Trajectory,
)
from evolve.skills.predicates import FactBase, bind_predicates, match_conditions, template_slots
from evolve.skills.retrieval import GoalTracker, KnowledgeIndex, RetrievalConfig, SkillMatch
from evolve.stores import ExperienceStore
from evolve.stores.embedders import Embedder, make_embedder
from evolve.stores.hybrid import Reranker, make_reranker
from evolve.text import normalise as norm

_FAIL_CAUSES = {FailureCause.invalid_action, FailureCause.no_effect, FailureCause.precondition_unmet}


class MemoryConfig(RetrievalConfig):
    """Knobs of :class:`EvolveMemory` (picklable, so it travels to worker processes).

    The retrieval cut-offs and weights (``min_applicability``, ``min_score``, ``propose_score``,
    ``max_candidates``, ``w_goal``, ``w_similarity``) are inherited from :class:`RetrievalConfig`:
    the memory hands itself to its :class:`KnowledgeIndex`.
    """

    top_k_skills: int = Field(3, ge=0)
    top_k_guardrails: int = Field(3, ge=0)
    propose: bool = True
    """Execute applicable skills as macro actions (off: only inject them into the prompt)."""
    enforce: bool = True
    """Refuse actions that break an applicable guardrail."""
    episodic_guard: bool = True
    """Refuse an action that already failed in the same state, or that repeats a detected loop."""
    replan_after: int = Field(12, ge=1)
    """Steps without finishing a goal sentence before local replanning moves past it."""
    log_top: int = Field(10, ge=0)
    """Candidates logged per step and kind, best first (the reranker's training data; injected
    ones are always logged)."""
    replan_score: float = 0.25
    """Lower propose cut-off right after a loop/stagnation event (exploring a new approach)."""
    continue_relevance: float = 0.3
    """Goal relevance a macro's next step needs, unless it acts on objects the macro already bound."""


@dataclass
class _Macro:
    skill: Skill
    index: int
    step: int
    binding: dict[str, str]
    expected: str = ""
    start_state: Any = None

    @property
    def acted(self) -> set[str]:
        """Slots bound by the steps taken so far (not by guessing through preconditions)."""
        return {x for t in self.skill.steps[: self.step] for x in template_slots(t)}


@dataclass
class _Episode:
    task: Task | None = None
    goal: str = ""
    tracker: GoalTracker | None = None
    synced: int = 0
    macro: _Macro | None = None
    banned: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    failed_skills: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Per state: skills whose memory-executed step the env refused there (not offered again until it changes)."""
    taken: Counter[tuple[str, str]] = field(default_factory=Counter)
    looping: bool = False
    replanning: bool = False
    notes: list[str] = field(default_factory=list)
    matches: list[SkillMatch] = field(default_factory=list)
    matches_at: int = -1
    query: str = ""
    """The text this step's candidates were retrieved for (goal + observation)."""
    used: dict[str, str] = field(default_factory=dict)
    """Knowledge that acted: skills whose steps were executed, guardrails that refused an action."""
    injected: set[str] = field(default_factory=set)
    """Knowledge handed to the planner at least once."""
    verified: set[str] = field(default_factory=set)
    logs: list[RetrievalLog] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


def _changed(step: Step) -> bool:
    return not diff_states(step.pre_state.state, step.post_state.state).empty


def _refused_by_env(step: Step) -> bool:
    """A memory-executed step the env did not accept as a command (``invalid_action``), not one that
    only had no effect: TextWorld's skills rightly try the next binding after "that doesn't fit"."""
    d = step.diagnosis
    executed = step.action.source in (ActionSource.skill, ActionSource.replan)
    return executed and d is not None and any(c.cause == FailureCause.invalid_action for c in d.causes)


def _failed(step: Step) -> bool:
    d = step.diagnosis
    if d is not None and any(c.cause in _FAIL_CAUSES for c in d.causes):
        return True
    return not _changed(step)


class EvolveMemory:
    """AgentHooks over a snapshot of skills and guardrails (see the module docstring)."""

    def __init__(
        self,
        knowledge: Sequence[Knowledge] = (),
        *,
        embedder: str | Embedder | None = "hash",
        namespace: str = "default",
        env: str | None = None,
        statuses: Sequence[str | KnowledgeStatus] = ("active",),
        config: MemoryConfig | None = None,
        reranker: str | Reranker | None = None,
    ) -> None:
        self.namespace = namespace
        self.config = config or MemoryConfig()
        knowledge = [k for k in knowledge if not env or not k.env or k.env == env]
        skills = [k for k in knowledge if isinstance(k, Skill)]
        guards = [k for k in knowledge if isinstance(k, Guardrail)]
        emb = make_embedder(embedder) if isinstance(embedder, str) or embedder is None else embedder
        rr = make_reranker(reranker) if isinstance(reranker, str) else reranker
        self.index = KnowledgeIndex(skills, guards, emb, statuses, self.config, reranker=rr)
        self.usage: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        """knowledge id -> [uses, successes, failures] accumulated over this object's episodes."""
        self._logs: list[RetrievalLog] = []
        self._ep = _Episode()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_store(
        cls,
        store: ExperienceStore,
        namespace: str | None = None,
        env: str | None = None,
        statuses: Sequence[str] = ("active",),
        **kwargs: Any,
    ) -> EvolveMemory:
        """A memory over the store's current knowledge (a snapshot: later writes are not seen)."""
        ns = namespace or store.namespace
        knowledge = [
            *store.skills(ns, status=list(statuses), env=env),
            *store.guardrails(ns, status=list(statuses), env=env),
        ]
        return cls(knowledge, namespace=ns, env=env, statuses=statuses, **kwargs)

    @classmethod
    def factory(
        cls,
        knowledge: Sequence[Knowledge],
        embedder: str = "hash",
        *,
        namespace: str = "default",
        env: str | None = None,
        statuses: Sequence[str] = ("active",),
        config: MemoryConfig | None = None,
        reranker: str | None = None,
    ) -> EvolveMemoryFactory:
        """A picklable zero-arg callable building this memory inside a worker process
        (``reranker``: a spec for :func:`~evolve.stores.hybrid.make_reranker`, e.g. a model dir)."""
        return EvolveMemoryFactory(
            knowledge=tuple(knowledge),
            embedder=embedder,
            namespace=namespace,
            env=env,
            statuses=tuple(str(KnowledgeStatus(s).value) for s in statuses),
            config=config,
            reranker=reranker,
        )

    @property
    def skills(self) -> list[Skill]:
        return self.index.skills

    @property
    def guardrails(self) -> list[Guardrail]:
        return self.index.guardrails

    # ------------------------------------------------------------------ hooks

    def on_episode_start(self, task: Task, obs: Observation) -> None:
        goal = task.goal or obs.goal
        tracker = GoalTracker(goal, self.index.vocabulary, arg_words=self.index.arg_words)
        self._ep = _Episode(task=task, goal=goal, tracker=tracker)

    def _log_ranked(self, step: int, ranked: list[tuple[Knowledge, Any]], injected: set[str]) -> None:
        """Log every scored candidate up to ``log_top`` (and every injected one), with its rank;
        ``ranked`` pairs each item with its match (score, applicable, reason, similarity, rerank)."""
        for rank, (k, m) in enumerate(ranked):
            if rank < self.config.log_top or k.id in injected:
                self._log(
                    step,
                    k,
                    rank,
                    m.score,
                    m.applicable,
                    k.id in injected,
                    m.reason,
                    similarity=getattr(m, "similarity", None),
                    rerank_score=getattr(m, "rerank_score", None),
                )

    def _log(
        self,
        step: int,
        knowledge: Knowledge,
        rank: int,
        score: float,
        applicable: bool,
        injected: bool,
        reason: str,
        similarity: float | None = None,
        rerank_score: float | None = None,
    ) -> None:
        self._ep.logs.append(
            RetrievalLog(
                namespace=self.namespace,
                trajectory_id="",
                step_index=step,
                knowledge_id=knowledge.id,
                kind=knowledge.kind,  # type: ignore[arg-type]
                score=float(score),
                applicable=applicable,
                injected=injected,
                reason=reason[:300],
                query=self._ep.query,
                rank=rank,
                similarity=None if similarity is None else float(similarity),
                rerank_score=None if rerank_score is None else float(rerank_score),
            )
        )

    def _sync(self, history: list[Step]) -> None:
        """Digest the steps taken since the last call: goal progress, failures, macro progress."""
        ep = self._ep
        for step in history[ep.synced :]:
            action = step.action.text
            key = state_key(step.pre_state)
            ep.taken[(key, norm(action))] += 1
            changed = _changed(step)
            failed = _failed(step)
            blocked = step.post_state.info.get("guardrail_blocked")
            gid = step.post_state.info.get("guardrail_id")
            if gid:
                ep.used.setdefault(str(gid), "guardrail")
            if failed and not blocked:
                ep.banned[key].add(norm(action))
                if step.action.skill_id and _refused_by_env(step):
                    ep.failed_skills[key].add(step.action.skill_id)
            if ep.tracker is not None and not blocked:
                ep.tracker.observe(
                    action,
                    changed and not failed,
                    self.index.cues_for(action),
                    self.index.effects_for(action),
                    facts=FactBase.from_state(step.pre_state.state),
                )
            if step.action.skill_id:
                ep.used.setdefault(step.action.skill_id, "skill")
            self._advance_macro(step, failed or bool(blocked))
            d: Diagnosis | None = step.diagnosis
            ep.looping = bool(d and (d.looping or any(c.cause == FailureCause.loop for c in d.causes)))
            stagnated = bool(d and any(c.cause == FailureCause.stagnation for c in d.causes))
            if ep.looping or stagnated:
                self._replan("loop" if ep.looping else "stagnation", step)
        ep.synced = len(history)
        tracker = ep.tracker
        if tracker is not None and history and tracker.checks:
            for i in tracker.revalidate(FactBase.from_state(history[-1].post_state.state)):
                ep.notes.append(f"Sub-goal '{tracker.sentences[i]}' is undone again; redo it.")
        if tracker is not None and tracker.pending and tracker.steps_since_done >= self.config.replan_after:
            skipped = tracker.defer_first()
            if skipped is not None:
                ep.counts["replans"] += 1
                nxt = tracker.next_text()
                ep.notes.append(
                    f"Replanning: no progress on '{tracker.sentences[skipped]}' for {self.config.replan_after} "
                    f"steps; moving on" + (f" to '{nxt}'" if nxt else "")
                )

    def _advance_macro(self, step: Step, failed: bool) -> None:
        ep = self._ep
        m = ep.macro
        if m is None or step.action.skill_id != m.skill.id:
            if m is not None and step.action.source not in (ActionSource.skill, ActionSource.replan):
                # The planner went its own way: the macro is interrupted (not failed).
                ep.macro = None
            return
        if failed:
            ep.macro = None
            ep.counts["abandoned"] += 1
            ep.notes.append(
                f"Skill '{m.skill.name}' abandoned: step '{step.action.text}' failed; replan from here."
            )
            return
        m.step += 1
        if m.step >= len(m.skill.steps):
            ep.macro = None
            if self._verified(m, step):
                ep.verified.add(m.skill.id)

    def _verified(self, m: _Macro, last: Step) -> bool:
        """Do the skill's verification predicates hold after its last step (bound where known)?"""
        post = last.post_state.state
        facts = FactBase.from_state(post)
        preds = [v for v in m.skill.verification if v not in ("moved", "score increased")]
        ok = True
        if "moved" in m.skill.verification and m.start_state is not None:
            ok = ok and post.location != m.start_state.location
        if "score increased" in m.skill.verification and m.start_state is not None:
            ok = ok and post.score > m.start_state.score
        if preds:
            sat, tot, _ = match_conditions(preds, facts, m.binding)
            ok = ok and sat == tot
        return ok

    def _replan(self, why: str, step: Step) -> None:
        ep = self._ep
        ep.replanning = True
        ep.counts["replans"] += 1
        if ep.macro is not None:
            ep.notes.append(f"Skill '{ep.macro.skill.name}' interrupted by {why}.")
            ep.macro = None
        ep.banned[state_key(step.pre_state)].add(norm(step.action.text))

    def _score(self, obs: Observation, step_index: int) -> list[SkillMatch]:
        ep = self._ep
        if ep.matches_at == step_index:
            return ep.matches
        query = ep.query = f"{ep.goal}\n{obs.text}"[:2000]
        if ep.tracker is not None:
            ep.tracker.entities = [norm(x) for x in [*obs.state.visible, *obs.state.inventory]]
        key = state_key(obs)

        # Skills are bound to actions their guardrails allow: the paint task's skill said "do 'focus
        # on paint in cup containing yellow paint'" and the next note said a guardrail refused it.
        def allowed(action: str) -> bool:
            return self.index.check(action, obs, ep.goal).allowed

        enforce = self.config.enforce and bool(self.index.guardrails)
        ep.matches = self.index.score_skills(
            obs, ep.tracker, query, banned=ep.banned.get(key, set()), allowed=allowed if enforce else None
        )
        # A skill whose step the env refused as a command is not offered again in the same state
        # with the next binding: ScienceWorld lists `focus on bee 0` .. `bee 4` as valid and rejects each,
        # and the 1.5B agent's evolve arm spent 10 of 25 steps replaying them (BENCHMARKS.md).
        for m in ep.matches:
            if m.applicable and m.skill.id in ep.failed_skills.get(key, ()):
                m.applicable, m.action = False, None
                m.reason = "the env refused its step in this state; not again until the state changes"
        ep.matches_at = step_index
        return ep.matches

    def retrieve(self, obs: Observation, history: list[Step]) -> MemoryContext:
        ep = self._ep
        if ep.tracker is None:  # hooks used without on_episode_start
            self.on_episode_start(Task(id="?", env="", goal=obs.goal), obs)
            ep = self._ep
        self._sync(history)
        step_index = len(history)
        matches = self._score(obs, step_index)
        cfg = self.config
        injected = [m for m in matches if m.applicable and m.score >= cfg.min_score][: cfg.top_k_skills]
        inj_ids = {m.skill.id for m in injected}
        ep.injected |= inj_ids
        self._log_ranked(step_index, [(m.skill, m) for m in matches], inj_ids)
        skills = [self._bound_copy(m) for m in injected]
        guards: list[Guardrail] = []
        if cfg.top_k_guardrails and self.index.guardrails:
            gms = self.index.guardrail_matches(obs, ep.goal)
            guards = [g.guardrail for g in gms if g.applicable][: cfg.top_k_guardrails]
            guard_ids = {g.id for g in guards}
            ep.injected |= guard_ids
            self._log_ranked(step_index, [(gm.guardrail, gm) for gm in gms], guard_ids)
        notes = list(ep.notes)
        ep.notes = []
        if ep.tracker is not None and ep.tracker.next_text() and (injected or notes):
            notes.append(f"Next sub-goal: {ep.tracker.next_text()}")
        if injected and injected[0].action:
            notes.append(f"Skill '{injected[0].skill.name}' applies now: do '{injected[0].action}'.")
        return MemoryContext(skills=skills, guardrails=guards, notes=notes, blocked=self._refused_here(obs))

    def _refused_here(self, obs: Observation) -> list[str]:
        """The admissible actions the episodic guard would refuse in this state, listed up front so
        that the planner is not asked (and re-asked) about them: the 1.5B model spent whole steps
        proposing an action the loop guard had already refused in the same state (BENCHMARKS.md)."""
        if not self.config.episodic_guard:
            return []
        ep = self._ep
        key = state_key(obs)
        refused = set(ep.banned.get(key, set()))
        refused |= {a for (k, a), n in ep.taken.items() if k == key and n >= 2}
        if not refused:
            return []
        if obs.admissible_actions is None:
            return sorted(refused)
        return [a for a in dict.fromkeys(obs.admissible_actions) if norm(a) in refused]

    @staticmethod
    def _bound_copy(m: SkillMatch) -> Skill:
        """The skill with its steps and preconditions bound to this state (same id, for the planner)."""
        from evolve.skills.distill import bound_steps

        return m.skill.model_copy(
            update={
                "steps": bound_steps(m.skill, m.binding),
                "preconditions": bind_predicates(m.skill.preconditions, m.binding),
                "verification": bind_predicates(m.skill.verification, m.binding),
            }
        )

    def propose(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Action | None:
        if not self.config.propose or not self.index.skills:
            return None
        ep = self._ep
        step_index = len(history)
        banned = ep.banned.get(state_key(obs), set())
        m = ep.macro
        if m is not None:
            facts = FactBase.from_state(obs.state)
            cont = self.index.match_skill(
                m.index, obs, facts, ep.tracker, 0.0, step=m.step, binding=m.binding, banned=banned
            )
            slots = template_slots(m.skill.steps[m.step])
            # A step about objects the macro already bound is its own plan ("unlock X" -> "open X");
            # any other step must still serve the goal, or the macro came from another situation.
            planned = bool(slots) and all(x in m.acted for x in slots)
            if cont.action is not None and (planned or cont.relevance >= self.config.continue_relevance):
                m.binding.update(cont.binding)
                m.expected = cont.action
                ep.counts["macro_steps"] += 1
                return Action(
                    text=cont.action,
                    thought=f"skill '{m.skill.name}' step {m.step + 1}/{len(m.skill.steps)}",
                    source=ActionSource.skill,
                    skill_id=m.skill.id,
                )
            ep.macro = None
            ep.counts["abandoned"] += 1
            ep.notes.append(
                f"Skill '{m.skill.name}' abandoned: step {m.step + 1} is not possible or not wanted here."
            )
        threshold = self.config.replan_score if ep.replanning else self.config.propose_score
        for cand in self._score(obs, step_index):
            if cand.score < threshold:
                break
            if not cand.applicable or cand.action is None or norm(cand.action) in banned:
                continue
            source = ActionSource.replan if ep.replanning else ActionSource.skill
            ep.replanning = False
            if len(cand.skill.steps) > 1:
                ep.macro = _Macro(
                    cand.skill,
                    self.index.skills.index(cand.skill),
                    0,
                    dict(cand.binding),
                    cand.action,
                    obs.state,
                )
            ep.counts["proposed"] += 1
            return Action(
                text=cand.action,
                thought=f"skill '{cand.skill.name}' ({cand.reason})",
                source=source,
                skill_id=cand.skill.id,
            )
        ep.replanning = False
        return None

    def check_action(self, action: Action, obs: Observation, memory: MemoryContext) -> GuardrailVerdict:
        ep = self._ep
        if self.config.enforce and self.index.guardrails:
            verdict = self.index.check(action.text, obs, ep.goal)
            if not verdict.allowed:
                if verdict.guardrail_id:
                    ep.used.setdefault(verdict.guardrail_id, "guardrail")
                ep.counts["blocked"] += 1
                return verdict
        if self.config.episodic_guard:
            key, a = state_key(obs), norm(action.text)
            if a in ep.banned.get(key, set()):
                ep.counts["episodic_blocked"] += 1
                return GuardrailVerdict(
                    allowed=False, reason=f"'{action.text}' already failed or looped in this very state"
                )
            if ep.taken[(key, a)] >= 2:
                ep.counts["episodic_blocked"] += 1
                return GuardrailVerdict(
                    allowed=False,
                    reason=f"'{action.text}' was already taken twice in this very state (a loop)",
                )
        return GuardrailVerdict()

    def diagnose(self, step: Step, history: list[Step]) -> Diagnosis | None:
        # The agent's rule diagnoser fills diagnoses; this memory reacts to them in _sync.
        return None

    def on_episode_end(self, traj: Trajectory) -> None:
        ep = self._ep
        self._sync(traj.steps)
        outcome = traj.outcome.value if traj.outcome != Outcome.running else "unknown"
        won = traj.success
        for kid in ep.used:
            u = self.usage[kid]
            u[0] += 1
            u[1 if won else 2] += 1
        for k in [*self.index.skills, *self.index.guardrails]:
            if k.id in ep.used:
                k.stats.uses += 1
                if won:
                    k.stats.successes += 1
                else:
                    k.stats.failures += 1
        used_at = {(s.index, s.action.skill_id) for s in traj.steps if s.action.skill_id}
        for r in ep.logs:
            r.trajectory_id = traj.id
            executed = (r.step_index, r.knowledge_id) in used_at
            verified = " verified" if r.knowledge_id in ep.verified and executed else ""
            r.outcome = f"{outcome}{'; executed' if executed else ''}{verified}"
        self._logs.extend(ep.logs)
        traj.metadata["evolve"] = {
            "used": dict(ep.used),
            "injected": sorted(ep.injected),
            "verified": sorted(ep.verified),
            **{k: int(v) for k, v in ep.counts.items()},
            "goal_sentences_done": sum(ep.tracker.done) if ep.tracker else 0,
        }
        self._ep = _Episode()

    # ------------------------------------------------------------------ results

    def pop_retrieval_logs(self) -> list[RetrievalLog]:
        """Retrieval logs of finished episodes since the last call (collect() stores them)."""
        out, self._logs = self._logs, []
        return out

    def flush(self, store: ExperienceStore, namespace: str | None = None) -> int:
        """Write the retrieval logs and usage stats gathered so far to ``store``; returns logs written."""
        logs = self.pop_retrieval_logs()
        if namespace:
            logs = [r.model_copy(update={"namespace": namespace}) for r in logs]
        store.log_retrievals(logs)
        store.record_usage(
            {k: (v[0], v[1], v[2]) for k, v in self.usage.items()}, namespace=namespace or self.namespace
        )
        self.usage.clear()
        return len(logs)


@dataclass(frozen=True)
class EvolveMemoryFactory:
    """Builds an :class:`EvolveMemory` in a worker process (picklable: models and strings only)."""

    knowledge: tuple[Knowledge, ...]
    embedder: str = "hash"
    namespace: str = "default"
    env: str | None = None
    statuses: tuple[str, ...] = ("active",)
    config: MemoryConfig | None = None
    reranker: str | None = None

    def __call__(self) -> EvolveMemory:
        return EvolveMemory(
            list(self.knowledge),
            embedder=self.embedder,
            namespace=self.namespace,
            env=self.env,
            statuses=self.statuses,
            config=self.config,
            reranker=self.reranker,
        )


def usage_from_trajectories(trajs: Sequence[Trajectory]) -> dict[str, tuple[int, int, int]]:
    """``(uses, successes, failures)`` per knowledge id, read from ``metadata["evolve"]["used"]``
    (what worker processes report back), for :meth:`ExperienceStore.record_usage`."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for t in trajs:
        used = (t.metadata.get("evolve") or {}).get("used") or {}
        for kid in used:
            u = out[kid]
            u[0] += 1
            u[1 if t.success else 2] += 1
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}
