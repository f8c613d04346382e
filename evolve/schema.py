"""The one vocabulary every stage of evolve speaks.

Every model here round-trips exactly through JSON (``model_dump_json`` /
``model_validate_json``) and carries ``schema_version`` where it is stored, so
that data written by an older evolve can be migrated instead of lost.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from abc import abstractmethod
from datetime import datetime, timezone
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def new_id(prefix: str = "") -> str:
    """A short random id, optionally prefixed (``traj-3f2a...``)."""
    u = uuid.uuid4().hex[:16]
    return f"{prefix}-{u}" if prefix else u


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


# --------------------------------------------------------------------------- environment


class Split(str, Enum):
    train = "train"
    dev = "dev"
    test = "test"


class Task(_Model):
    """One episode specification: which game / variation, and its goal text."""

    id: str
    env: str
    split: Split = Split.train
    goal: str = ""
    params: dict[str, Any] = Field(default_factory=dict)


class EnvState(_Model):
    """The structured part of an observation; the diagnoser diffs two of these."""

    location: str | None = None
    inventory: list[str] = Field(default_factory=list)
    visible: list[str] = Field(default_factory=list)
    score: float = 0.0
    max_score: float | None = None
    done: bool = False
    won: bool = False
    lost: bool = False
    moves: int = 0
    facts: list[str] = Field(default_factory=list)
    """State predicates (``at(player, kitchen)``, ``in(apple, fridge)``) when the env exposes them."""


class Observation(_Model):
    """What a policy sees after ``reset`` or ``step``."""

    text: str
    state: EnvState = Field(default_factory=EnvState)
    goal: str = ""
    admissible_actions: list[str] | None = None
    reward: float = 0.0
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state.done


class Privileged(_Model):
    """Information only oracle teachers and privileged-information training may see."""

    gold_actions: list[str] = Field(default_factory=list)
    facts: list[str] = Field(default_factory=list)
    notes: str = ""


# --------------------------------------------------------------------------- one step


class ActionSource(str, Enum):
    policy = "policy"
    skill = "skill"
    oracle = "oracle"
    replan = "replan"
    fallback = "fallback"


class Action(_Model):
    text: str
    thought: str = ""
    source: ActionSource = ActionSource.policy
    skill_id: str | None = None
    raw: str | None = None
    """The policy's raw output (model text) before parsing, kept for diagnosis and training."""


class TokenUsage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )


class Timings(_Model):
    policy_s: float = 0.0
    env_s: float = 0.0
    memory_s: float = 0.0
    total_s: float = 0.0


class FailureCause(str, Enum):
    """The enumerated failure-cause taxonomy produced by the diagnoser."""

    invalid_action = "invalid_action"  # not admissible / parser did not understand it
    no_effect = "no_effect"  # admissible but nothing changed
    precondition_unmet = "precondition_unmet"  # env said a requirement is missing
    regression = "regression"  # score or progress went down
    loop = "loop"  # repeating a cycle of actions/states
    stagnation = "stagnation"  # no progress for a window of steps
    step_limit = "step_limit"  # episode ran out of steps
    env_error = "env_error"  # the environment crashed or raised
    policy_error = "policy_error"  # endpoint down, malformed model output after retries
    guardrail_blocked = "guardrail_blocked"  # a guardrail refused the proposed action
    lost = "lost"  # the env declared the episode lost


class CauseEvidence(_Model):
    cause: FailureCause
    evidence: str


class StateDiff(_Model):
    location_from: str | None = None
    location_to: str | None = None
    inventory_added: list[str] = Field(default_factory=list)
    inventory_removed: list[str] = Field(default_factory=list)
    visible_added: list[str] = Field(default_factory=list)
    visible_removed: list[str] = Field(default_factory=list)
    facts_added: list[str] = Field(default_factory=list)
    facts_removed: list[str] = Field(default_factory=list)
    score_delta: float = 0.0

    @property
    def empty(self) -> bool:
        return (
            self.location_from == self.location_to
            and not self.inventory_added
            and not self.inventory_removed
            and not self.visible_added
            and not self.visible_removed
            and not self.facts_added
            and not self.facts_removed
            and self.score_delta == 0.0
        )

    def summary(self) -> str:
        parts: list[str] = []
        if self.location_from != self.location_to:
            parts.append(f"moved {self.location_from} -> {self.location_to}")
        if self.inventory_added:
            parts.append("took " + ", ".join(self.inventory_added))
        if self.inventory_removed:
            parts.append("dropped/used " + ", ".join(self.inventory_removed))
        if self.facts_added:
            parts.append("now " + ", ".join(self.facts_added[:4]))
        if self.score_delta:
            parts.append(f"score {self.score_delta:+g}")
        return "; ".join(parts) if parts else "no change"


class Diagnosis(_Model):
    """Fine-grained signals for one step (or, with ``step_index=-1``, a whole episode)."""

    step_index: int
    diff: StateDiff = Field(default_factory=StateDiff)
    causes: list[CauseEvidence] = Field(default_factory=list)
    progress: float = 0.0
    """Score delta of this step, normalised by max score when known."""
    cumulative_progress: float = 0.0
    steps_since_progress: int = 0
    stagnating: bool = False
    looping: bool = False
    segment: int = 0
    """Subgoal segment index: segments are separated by progress events."""
    root_cause: str | None = None
    source: Literal["rules", "llm"] = "rules"

    @property
    def failed(self) -> bool:
        return bool(self.causes)

    def cause_names(self) -> list[str]:
        return [c.cause.value for c in self.causes]


class Segment(_Model):
    """A stretch of an episode between two progress events: the unit skills are distilled from."""

    trajectory_id: str
    index: int
    start: int
    """Index of the first step in the segment."""
    end: int
    """Index one past the last step."""
    actions: list[str] = Field(default_factory=list)
    pre_facts: list[str] = Field(default_factory=list)
    post_facts: list[str] = Field(default_factory=list)
    diff: StateDiff = Field(default_factory=StateDiff)
    progress: float = 0.0
    succeeded: bool = False
    """True when the segment ends in a progress event (score up or episode won)."""
    summary: str = ""


class Step(_Model):
    """One experience tuple ``(pre_state, action, diagnosis, post_state)``."""

    index: int
    pre_state: Observation
    action: Action
    post_state: Observation
    reward: float = 0.0
    done: bool = False
    diagnosis: Diagnosis | None = None
    timings: Timings = Field(default_factory=Timings)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    error: str | None = None
    retrieved: list[str] = Field(default_factory=list)
    """Ids of the skills/guardrails that were injected for this step."""
    memory_prompt: str = ""
    """The memory block the policy was shown for this step, verbatim ('' when none): with the
    goal and the earlier steps it re-renders the exact prompt (``evolve.llm.prompts.step_messages``)."""

    @property
    def observation(self) -> str:
        return self.post_state.text


class Outcome(str, Enum):
    success = "success"
    failure = "failure"
    step_limit = "step_limit"
    error = "error"
    running = "running"


class Trajectory(_Model):
    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: new_id("traj"))
    namespace: str = "default"
    run_id: str | None = None
    task_id: str
    env: str
    split: Split = Split.train
    goal: str = ""
    policy: str = ""
    arm: str = ""
    """Experimental arm (``no_memory``, ``raw_retrieval``, ``evolve``...) when part of an eval."""
    outcome: Outcome = Outcome.running
    score: float = 0.0
    max_score: float | None = None
    steps: list[Step] = Field(default_factory=list)
    diagnosis: Diagnosis | None = None
    seed: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.outcome == Outcome.success

    @property
    def normalized_score(self) -> float:
        """Score on a 0-100 scale when the env knows its maximum."""
        if self.max_score:
            return 100.0 * self.score / self.max_score
        return self.score

    def usage(self) -> TokenUsage:
        total = TokenUsage()
        for s in self.steps:
            total = total + s.usage
        return total


# --------------------------------------------------------------------------- knowledge


class KnowledgeStatus(str, Enum):
    candidate = "candidate"
    active = "active"
    retired = "retired"


class KnowledgeStats(_Model):
    """Usage outcomes; confidence is a Beta(1,1)-smoothed success estimate."""

    uses: int = 0
    successes: int = 0
    failures: int = 0
    probation_runs: int = 0
    effect: float | None = None
    """Measured effect on held-out replay (success-rate delta vs. without it)."""

    @property
    def confidence(self) -> float:
        return (self.successes + 1) / (self.uses + 2)


class Knowledge(_Model):
    """What skills and guardrails share: ownership, lifecycle (status, versions), usage and provenance."""

    kind: ClassVar[str] = ""
    """``"skill"`` or ``"guardrail"``: the store's table family and the retrieval logs use it."""

    schema_version: int = SCHEMA_VERSION
    id: str = ""
    namespace: str = "default"
    env: str = ""
    description: str = ""
    signature: str = ""
    status: KnowledgeStatus = KnowledgeStatus.candidate
    stats: KnowledgeStats = Field(default_factory=KnowledgeStats)
    provenance: list[str] = Field(default_factory=list)
    """Ids of the source trajectories."""
    version: int = 1
    parent_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)

    @abstractmethod
    def text(self) -> str:
        """The item as one line of prose (what a planner prompt and the search index see)."""


class Skill(Knowledge):
    """A reusable procedure distilled from successful segments."""

    kind: ClassVar[str] = "skill"
    id: str = Field(default_factory=lambda: new_id("skill"))
    name: str
    preconditions: list[str] = Field(default_factory=list)
    """State predicates that must hold to apply it (``has(knife)``, ``at(kitchen)``)."""
    steps: list[str] = Field(default_factory=list)
    """Action templates with ``{slot}`` variables."""
    slots: dict[str, list[str]] = Field(default_factory=dict)
    """Values each slot took in the source episodes."""
    verification: list[str] = Field(default_factory=list)
    """Predicate changes that mark the skill as having succeeded."""
    tags: list[str] = Field(default_factory=list)

    def text(self) -> str:
        pre = "; ".join(self.preconditions) or "none"
        return f"{self.name}: {self.description}. When: {pre}. Steps: " + " -> ".join(self.steps)


class GuardrailScope(str, Enum):
    subgoal = "subgoal"
    task = "task"


class Guardrail(Knowledge):
    """A constraint distilled from failures; enforced before an action runs."""

    kind: ClassVar[str] = "guardrail"
    id: str = Field(default_factory=lambda: new_id("guard"))
    root_cause: FailureCause
    trigger: list[str] = Field(default_factory=list)
    """State predicates under which the guardrail applies; empty = always within scope."""
    forbidden_action: str
    """A regular expression matched (fully, case-insensitive) against the proposed action."""
    scope: GuardrailScope = GuardrailScope.task
    task_pattern: str = ""
    """For scope=task: regex over the task goal that the guardrail applies to ('' = any)."""

    def text(self) -> str:
        when = "; ".join(self.trigger) or "always"
        return f"Do not '{self.forbidden_action}' when {when}: {self.description} ({self.root_cause.value})"


# --------------------------------------------------------------------------- training data


class ExampleKind(str, Enum):
    sft = "sft"
    preference = "preference"
    privileged = "privileged"
    reranker = "reranker"


class TrainingExample(_Model):
    """One training record built from trajectories (consumed by the trainer, a later issue)."""

    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=lambda: new_id("ex"))
    namespace: str = "default"
    kind: ExampleKind
    messages: list[dict[str, Any]] = Field(default_factory=list)
    """Chat messages; assistant turns are the ones a loss is taken on."""
    chosen: str | None = None
    rejected: str | None = None
    privileged_context: str | None = None
    query: str | None = None
    documents: list[str] = Field(default_factory=list)
    labels: list[float] = Field(default_factory=list)
    weight: float = 1.0
    provenance: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    metadata: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- retrieval + runs


class RetrievalLog(_Model):
    """Which knowledge matched for a step, with scores, whether it was injected, and what followed."""

    id: str = Field(default_factory=lambda: new_id("ret"))
    namespace: str = "default"
    trajectory_id: str
    step_index: int
    knowledge_id: str
    kind: Literal["skill", "guardrail", "trajectory"]
    score: float
    applicable: bool
    injected: bool
    reason: str = ""
    outcome: str | None = None
    query: str = ""
    """The text the candidates were retrieved for (state, goal, subgoal): the reranker's query."""
    rank: int | None = None
    """Position among the step's candidates of this kind, best first (0-based)."""
    similarity: float | None = None
    """The hybrid-search score (dense + keyword) before applicability and reranking."""
    rerank_score: float | None = None
    """The reranker's score when one ran."""
    created_at: datetime = Field(default_factory=utcnow)


class TeacherLogprobs(_Model):
    """A teacher's top-k log-probs for one scored sequence, cached by prompt hash.

    Compact on purpose (what an API teacher gives back): per position the top-k token ids and their
    log-probs (float16 in the store), plus the log of the probability mass outside the top k.
    """

    prompt_hash: str
    teacher: str
    """Which teacher answered (model name @ endpoint, or a local path): part of the cache key."""
    token_ids: list[list[int]] = Field(default_factory=list)
    """``[position][k]`` top-k token ids."""
    logprobs: list[list[float]] = Field(default_factory=list)
    """``[position][k]`` their log-probs."""
    tail_logprob: list[float] = Field(default_factory=list)
    """``[position]`` log(1 - sum(exp(top-k))), the tail bucket (``-inf`` when the top k hold it all)."""
    created_at: datetime = Field(default_factory=utcnow)


class CheckpointStatus(str, Enum):
    candidate = "candidate"
    """Trained, not (yet) shown to beat the student it would replace."""
    active = "active"
    """Beat the run's student on the dev split: it is the run's student now."""
    rejected = "rejected"
    """Set aside by hand (``update_checkpoint``): never made active."""
    retired = "retired"
    """Was active; a later checkpoint that beat it took its place."""


class Checkpoint(_Model):
    """A trained student: where its weights are, what it was trained on (lineage), how it did."""

    id: str = Field(default_factory=lambda: new_id("ckpt"))
    namespace: str = "default"
    run_id: str
    policy: str
    """The key of the job's ``policies`` whose student this checkpoint may replace."""
    path: str
    """The merged model directory: ``{"kind": "hf", "path": path}`` runs it as a policy."""
    adapter_dir: str | None = None
    base_model: str
    method: str
    loss: str = ""
    status: CheckpointStatus = CheckpointStatus.candidate
    stale: bool = False
    """A trajectory it was trained on has been deleted since."""
    reason: str = ""
    """Why it is active or still a candidate (the probation verdict, in words)."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    """``train`` (steps, losses, tokens/s, ...) and ``dev`` (before / after on the dev split)."""
    example_ids: list[str] = Field(default_factory=list)
    trajectory_ids: list[str] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


BLOCKED_TITLE = "Refused in this state (not admissible now; choose another action):"
"""The title of the memory block's section that lists :attr:`MemoryContext.blocked`."""


class MemoryContext(_Model):
    """What memory hands the planner for one step: injected knowledge and control notes."""

    skills: list[Skill] = Field(default_factory=list)
    guardrails: list[Guardrail] = Field(default_factory=list)
    examples: list[str] = Field(default_factory=list)
    """Raw past-trajectory excerpts (the static-retrieval baseline)."""
    notes: list[str] = Field(default_factory=list)
    """Replanning messages and reasons for blocked actions, newest last."""
    blocked: list[str] = Field(default_factory=list)
    """Actions refused in this state (by a guardrail or the loop guard). The planner is shown them
    as refused and *not* among the admissible actions, and an answer naming one is not accepted:
    a re-ask that offers the refused action again only spends another call on it."""

    @property
    def empty(self) -> bool:
        return not (self.skills or self.guardrails or self.examples or self.notes or self.blocked)

    def prompt_text(self) -> str:
        """The block injected into an LLM planner's prompt ('' when there is nothing)."""
        parts: list[str] = []
        if self.skills:
            parts.append("Skills that worked before in similar states:")
            parts += [f"- {s.text()}" for s in self.skills]
        if self.guardrails:
            parts.append("Rules learned from past failures (actions breaking them are refused):")
            parts += [f"- {g.text()}" for g in self.guardrails]
        if self.examples:
            parts.append("Excerpts of past episodes:")
            parts += [f"- {e}" for e in self.examples]
        if self.notes:
            parts.append("Notes:")
            parts += [f"- {n}" for n in self.notes]
        if self.blocked:
            # Last, one action per line: the prompt code reads this section back from a recorded
            # block (``evolve.llm.prompts.blocked_actions``) to re-render the shortened action list.
            parts.append(BLOCKED_TITLE)
            parts += [f"- {a}" for a in dict.fromkeys(self.blocked)]
        return "\n".join(parts)


class GuardrailVerdict(_Model):
    allowed: bool = True
    guardrail_id: str | None = None
    reason: str = ""


class SearchHit(_Model):
    id: str
    kind: str
    namespace: str
    score: float
    text: str = ""
    dense_score: float | None = None
    keyword_score: float | None = None


def canonical_signature(predicates: list[str] | set[str], extra: str = "") -> str:
    """Canonical hash of a set of state predicates (order and case do not matter)."""
    norm = sorted({p.strip().lower() for p in predicates if p.strip()})
    payload = json.dumps([norm, extra.strip().lower()], separators=(",", ":"))
    return hashlib.sha1(payload.encode()).hexdigest()[:16]
