"""The rule-based diagnoser: offline, deterministic, always available.

Per step it fills a :class:`~evolve.schema.Diagnosis` (state diff, failure causes with quoted
evidence, progress bookkeeping, stagnation/loop flags, subgoal segment index); per episode it
aggregates the step causes into one ``step_index=-1`` Diagnosis.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from evolve.diagnose.detectors import LoopDetector, StagnationDetector
from evolve.diagnose.diff import diff_states, is_progress, state_key
from evolve.schema import (
    ActionSource,
    CauseEvidence,
    Diagnosis,
    FailureCause,
    Outcome,
    StateDiff,
    Step,
    Trajectory,
)
from evolve.text import normalise, one_line

# Feedback of TextWorld / Inform7, ScienceWorld and Jericho parsers that means "not a valid command".
INVALID_PATTERNS: tuple[str, ...] = (
    r"\bi (?:don'?t|didn'?t|do not|did not) understand\b",
    r"\bi'?m not sure what that means\b",
    r"\bnot a verb i recogni[sz]e\b",
    r"\bi only understood you as far as\b",
    r"\bno known action matches\b",
    r"\bunknown (?:action|command)\b",
    r"\bambiguous request\b",
    r"\bit'?s not clear how to\b",
    r"\bthat'?s not something you can\b",
    r"\bnot something you can\b",
    r"\byou can'?t see any such thing\b",
    r"\byou can'?t go that way\b",
    r"\bthere is no such\b",
    r"\bis not openable\b",
    r"\bfixed in place\b",
    r"\bplainly inedible\b",
    r"\bhardly portable\b",
    r"\bisn'?t available\b",
    r"\bthat noun did not make sense\b",
    r"\bi beg your pardon\b",
    r"\bwhat do you want to \w+",
    r"\byou can(?:no|')t\b",
)

# Feedback that names a requirement the agent has not met yet.
PRECONDITION_PATTERNS: tuple[str, ...] = (
    r"\byou (?:will |'ll )?(?:need|have) to\b",
    r"\byou need\b",
    r"\byou must\b",
    r"\b(?:is|are|seems to be|appears to be) (?:closed|locked|not open|turned off|not activated)\b",
    r"\b(?:is|are)n'?t open\b",
    r"\bit'?s (?:closed|locked)\b",
    r"\bcan(?:no|')t \w+(?: \w+)* without\b",
    r"\bwithout (?:a|an|the|first)\b",
    r"\b(?:too|pitch) dark\b",
    r"\bcarrying too many\b",
    r"\bhands are full\b",
    # "... first." ends a sentence; Inform's implicit actions read "(first taking the x)" and are no failure.
    r"(?<!\()\bfirst\s*[.!]",
)

# Feedback that says the action was understood but changed nothing.
NO_EFFECT_PATTERNS: tuple[str, ...] = (
    r"\bnothing (?:happens|happened|seems to happen|obvious happens)\b",
    r"\balready\b",
    r"\bno effect\b",
    r"\bdoes(?:n'?t| not) (?:seem to )?do anything\b",
)

# Error text that points at the policy (model endpoint, parser), not at the environment.
POLICY_ERROR_PATTERN = re.compile(
    r"policy|pars(?:e|ing)|endpoint|\bllm\b|\bmodel\b|completion|json|openai|\bapi\b|apiconnection"
    r"|apitimeout|rate.?limit",
    re.IGNORECASE,
)

# Actions that only reveal information; repeating one in the same state with the same answer is no_effect.
INFO_VERBS = frozenset(
    {"look", "l", "examine", "x", "inventory", "inv", "i", "read", "check", "inspect", "describe"}
    | {"score", "goal", "task", "help", "info", "wait", "wait1", "z"}
)

_INVALID = [re.compile(p, re.IGNORECASE) for p in INVALID_PATTERNS]
_PRECONDITION = [re.compile(p, re.IGNORECASE) for p in PRECONDITION_PATTERNS]
_NO_EFFECT = [re.compile(p, re.IGNORECASE) for p in NO_EFFECT_PATTERNS]

# Stable order in which causes of one step are listed.
CAUSE_ORDER: tuple[FailureCause, ...] = (
    FailureCause.env_error,
    FailureCause.policy_error,
    FailureCause.guardrail_blocked,
    FailureCause.invalid_action,
    FailureCause.precondition_unmet,
    FailureCause.no_effect,
    FailureCause.regression,
    FailureCause.lost,
    FailureCause.loop,
    FailureCause.stagnation,
    FailureCause.step_limit,
)
_RANK = {c: i for i, c in enumerate(CAUSE_ORDER)}

EVIDENCE_CHARS = 160
"""Length of the observation quote a cause's evidence carries."""

# Causes that end an episode by themselves; always kept in the episode diagnosis.
TERMINAL_CAUSES = frozenset({FailureCause.env_error, FailureCause.policy_error, FailureCause.lost})


def _sentence_around(text: str, match: re.Match[str]) -> str:
    """The sentence of ``text`` that contains ``match``: the quote a cause's evidence carries."""
    start = max(text.rfind(c, 0, match.start()) for c in ".!?\n") + 1
    ends = [i for i in (text.find(c, match.end()) for c in ".!?\n") if i >= 0]
    end = min(ends) + 1 if ends else len(text)
    return one_line(text[start:end].strip(), EVIDENCE_CHARS)


def _first_match(patterns: list[re.Pattern[str]], text: str) -> re.Match[str] | None:
    for p in patterns:
        m = p.search(text)
        if m:
            return m
    return None


def feedback_head(text: str, sentences: int = 2, limit: int = 300) -> str:
    """The first sentences of an observation: where envs put their verdict on the action.

    Failure patterns are matched only here so that long room descriptions further down cannot
    trigger them.
    """
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if p.strip()]
    return " ".join(parts[:sentences])[:limit]


def is_info_action(action: str) -> bool:
    """True for actions that only reveal information (look, inventory, examine X, read X, ...)."""
    words = normalise(action).split()
    return bool(words) and words[0] in INFO_VERBS


def classify_error(step: Step) -> FailureCause | None:
    """env_error or policy_error for a step that carries an error (or a fallback action)."""
    if step.error:
        if step.action.source == ActionSource.fallback or POLICY_ERROR_PATTERN.search(step.error):
            return FailureCause.policy_error
        return FailureCause.env_error
    if step.action.source == ActionSource.fallback:
        return FailureCause.policy_error
    return None


class RuleDiagnoser:
    """Stateful per episode: ``reset()`` at episode start, then ``observe(step)`` for every step."""

    def __init__(
        self,
        stagnation_window: int = 10,
        loop_window: int = 8,
        loop_min_repeats: int = 2,
        max_score: float | None = None,
    ) -> None:
        self.max_score = max_score
        self.stagnation = StagnationDetector(stagnation_window)
        self.loops = LoopDetector(loop_window, loop_min_repeats)
        self.reset()

    def reset(self) -> None:
        self.stagnation.reset()
        self.loops.reset()
        self.cumulative_progress = 0.0
        self.segment = 0
        self._seen_texts: set[str] = set()
        # (state key, action) -> observation texts it produced; repeated info actions are no_effect.
        self._answers: dict[tuple[str, str], set[str]] = {}

    def _max_score(self, step: Step) -> float | None:
        return step.post_state.state.max_score or step.pre_state.state.max_score or self.max_score

    def observe(self, step: Step) -> Diagnosis:
        """Diagnose one step, updating the episode state (detectors, progress, segment index)."""
        pre, post = step.pre_state, step.post_state
        diff = diff_states(pre.state, post.state)
        action = step.action.text
        text = post.text
        causes: list[CauseEvidence] = []

        def add(cause: FailureCause, evidence: str) -> None:
            causes.append(CauseEvidence(cause=cause, evidence=evidence))

        error_cause = classify_error(step)
        if error_cause is not None:
            if step.error:
                add(error_cause, f"error on '{action}': {one_line(step.error, EVIDENCE_CHARS)}")
            else:
                raw = f"; raw output: {one_line(step.action.raw, 100)}" if step.action.raw else ""
                add(error_cause, f"action '{action}' is a fallback (policy output not usable){raw}")

        blocked = post.info.get("guardrail_blocked")
        executed = error_cause != FailureCause.env_error and not blocked
        if blocked:
            why = blocked if isinstance(blocked, str) else one_line(text, EVIDENCE_CHARS)
            add(FailureCause.guardrail_blocked, f"guardrail blocked '{action}': {why}")

        if executed:
            self._text_causes(step, diff, add)

        if diff.score_delta < 0:
            add(
                FailureCause.regression,
                f"score {pre.state.score:g} -> {post.state.score:g} after '{action}'",
            )
        if post.state.lost and not pre.state.lost:
            add(FailureCause.lost, f"episode lost after '{action}': {one_line(text, EVIDENCE_CHARS)}")

        progressed = is_progress(pre.state, post.state)
        if progressed:
            # The score is part of the state key, so no state before progress can recur after it.
            self.loops.reset()
        looping = False if progressed else self.loops.update(action, state_key(pre))
        if looping:
            add(FailureCause.loop, self.loops.evidence)
        if self.stagnation.update(progressed):
            add(FailureCause.stagnation, self.stagnation.evidence)

        max_score = self._max_score(step)
        progress = diff.score_delta / max_score if max_score else diff.score_delta
        self.cumulative_progress += progress
        diagnosis = Diagnosis(
            step_index=step.index,
            diff=diff,
            causes=sorted(causes, key=lambda c: _RANK[c.cause]),
            progress=progress,
            cumulative_progress=self.cumulative_progress,
            steps_since_progress=self.stagnation.steps_since_progress,
            stagnating=self.stagnation.active,
            looping=looping,
            segment=self.segment,
        )
        if progressed:
            self.segment += 1
        return diagnosis

    def _text_causes(self, step: Step, diff: StateDiff, add: Callable[[FailureCause, str], None]) -> None:
        """invalid_action, precondition_unmet and no_effect, read from admissibility and feedback."""
        pre = step.pre_state
        action, text = step.action.text, step.post_state.text
        norm_action = normalise(action)
        self._seen_texts.add(normalise(pre.text))
        norm_text = normalise(text)
        novel = norm_text not in self._seen_texts
        self._seen_texts.add(norm_text)
        key = (state_key(pre), norm_action)
        repeated_answer = norm_text in self._answers.get(key, set())
        self._answers.setdefault(key, set()).add(norm_text)

        found = False
        admissible = pre.admissible_actions
        if admissible is not None and norm_action not in {normalise(a) for a in admissible}:
            add(
                FailureCause.invalid_action,
                f"'{action}' is not among the {len(admissible)} admissible actions",
            )
            found = True
        # An action that moved the agent, changed its inventory or raised the score was accepted, whatever
        # the flavour text says (TextWorld rooms read "Need an exit without a door? ...").
        acted = diff.location_from != diff.location_to or diff.inventory_added or diff.inventory_removed
        head = "" if acted or diff.score_delta > 0 else feedback_head(text)
        # Answers to information actions describe states ("It is closed.") that are no failure of theirs.
        pre_match = None if is_info_action(action) else _first_match(_PRECONDITION, head)
        if pre_match:
            add(FailureCause.precondition_unmet, f"'{action}' -> \"{_sentence_around(head, pre_match)}\"")
            found = True
        elif not found:
            # A specific requirement message beats the generic "you can't" of the invalid list.
            inv_match = _first_match(_INVALID, head)
            if inv_match:
                add(FailureCause.invalid_action, f"'{action}' -> \"{_sentence_around(head, inv_match)}\"")
                found = True
        if found or not diff.empty:
            return
        ne_match = _first_match(_NO_EFFECT, head)
        if ne_match:
            add(FailureCause.no_effect, f"'{action}' -> \"{_sentence_around(head, ne_match)}\"")
        elif is_info_action(action):
            if repeated_answer:
                add(FailureCause.no_effect, f"'{action}' repeated in the same state with the same answer")
        elif not novel:
            add(FailureCause.no_effect, f"'{action}' changed nothing: \"{one_line(text, 100)}\" seen before")


def episode_won(traj: Trajectory) -> bool:
    """True when the outcome says success or the last state is won (hand-built trajectories)."""
    if traj.outcome == Outcome.success:
        return True
    return bool(traj.steps) and traj.steps[-1].post_state.state.won


def episode_diagnosis(traj: Trajectory, step_limit: int | None = None) -> Diagnosis:
    """Aggregate the (already filled) step diagnoses of ``traj`` into one ``step_index=-1`` Diagnosis.

    A won episode has no causes (``Diagnosis.failed`` means the episode failed); a failed one lists
    its dominant step causes (top 3 by count) plus every terminal cause (env/policy error, lost),
    plus ``step_limit`` when it ran out of steps without winning.
    """
    steps = traj.steps
    if not steps:
        causes: list[CauseEvidence] = []
        if traj.outcome == Outcome.step_limit:
            causes.append(CauseEvidence(cause=FailureCause.step_limit, evidence="episode has no steps"))
        return Diagnosis(step_index=-1, causes=causes, root_cause=_root(causes))
    diags = [s.diagnosis or Diagnosis(step_index=s.index) for s in steps]
    first, last = steps[0].pre_state.state, steps[-1].post_state.state
    diff = diff_states(first, last)
    max_score = traj.max_score or last.max_score or first.max_score
    progress = diff.score_delta / max_score if max_score else diff.score_delta

    causes = []
    if not episode_won(traj):
        counts: Counter[FailureCause] = Counter()
        first_seen: dict[FailureCause, tuple[int, str]] = {}
        for d in diags:
            for c in d.causes:
                counts[c.cause] += 1
                first_seen.setdefault(c.cause, (d.step_index, c.evidence))
        ranked = sorted(counts, key=lambda c: (-counts[c], _RANK[c]))
        keep = set(ranked[:3]) | (set(ranked) & TERMINAL_CAUSES)
        for cause in sorted(keep, key=lambda c: (-counts[c], _RANK[c])):
            idx, ev = first_seen[cause]
            causes.append(CauseEvidence(cause=cause, evidence=f"{counts[cause]}x, first at step {idx}: {ev}"))
        ran_out = traj.outcome == Outcome.step_limit or (
            step_limit is not None and len(steps) >= step_limit and not last.done
        )
        if ran_out and FailureCause.step_limit not in keep:
            limit = step_limit if step_limit is not None else len(steps)
            causes.append(
                CauseEvidence(
                    cause=FailureCause.step_limit,
                    evidence=f"ran {len(steps)}/{limit} steps without winning (score {last.score:g})",
                )
            )
    return Diagnosis(
        step_index=-1,
        diff=diff,
        causes=causes,
        progress=progress,
        cumulative_progress=diags[-1].cumulative_progress,
        steps_since_progress=diags[-1].steps_since_progress,
        stagnating=any(d.stagnating for d in diags),
        looping=any(d.looping for d in diags),
        segment=diags[-1].segment,
        root_cause=_root(causes),
    )


def _root(causes: list[CauseEvidence]) -> str | None:
    """Rule root cause: a terminal cause if any, else the most frequent one (step_limit is a symptom)."""
    if not causes:
        return None
    terminal = [c for c in causes if c.cause in TERMINAL_CAUSES]
    pick = (
        terminal[0]
        if terminal
        else next((c for c in causes if c.cause != FailureCause.step_limit), causes[0])
    )
    return f"{pick.cause.value}: {pick.evidence}"


def diagnose_trajectory(
    traj: Trajectory,
    step_limit: int | None = None,
    *,
    stagnation_window: int = 10,
    loop_window: int = 8,
    loop_min_repeats: int = 2,
) -> Trajectory:
    """A copy of ``traj`` with every step's diagnosis and the episode diagnosis filled (pure)."""
    out = traj.model_copy(deep=True)
    rules = RuleDiagnoser(stagnation_window, loop_window, loop_min_repeats, max_score=traj.max_score)
    for step in out.steps:
        step.diagnosis = rules.observe(step)
    out.diagnosis = episode_diagnosis(out, step_limit=step_limit)
    return out
