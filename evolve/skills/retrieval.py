"""Retrieval with applicability: which skills and guardrails fit *this* state, and how well.

Knowledge speaks in templated predicates (``in({obj1}, I)``, ``locked({obj2})``) and templated
actions (``unlock {obj2} with {obj1}``). Applying it means *binding* slots to what the current
state holds (the matching itself lives in :mod:`evolve.skills.predicates`, enforcement in
:mod:`evolve.skills.enforce`):

* a skill's next step is bound by matching its template against the admissible actions; its
  preconditions are then checked against the state's facts, unbound slots existentially;
  applicability is the fraction of preconditions satisfied;
* a guardrail's ``forbidden_action`` regex binds slots through named groups; it fires when its
  whole trigger holds under that binding and its scope matches the task.

Relevance combines goal grounding (does the bound action do what a pending sentence of the goal
asks for, with the goal words learned for the skill) and dense + keyword similarity; reliability
is the skill's usage confidence. The combined score has a cut-off, and every scored candidate can
be logged as a :class:`~evolve.schema.RetrievalLog`.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evolve.schema import (
    Guardrail,
    GuardrailVerdict,
    KnowledgeStatus,
    Observation,
    Skill,
)
from evolve.skills.enforce import GuardrailEnforcer, trigger_holds
from evolve.skills.grounding import action_parts, class_readings, grounding, split_sentences
from evolve.skills.predicates import (
    LEXICAL_PREFIX,
    SLOT,
    FactBase,
    bind_predicates,
    fill_template,
    is_kind_predicate,
    kinds_hold,
    match_conditions,
    template_regex,
)
from evolve.stores.embedders import Embedder
from evolve.stores.hybrid import HybridScorer, Reranker
from evolve.text import content_stems, stem, words
from evolve.text import normalise as norm

# --------------------------------------------------------------------------- goal tracking


class GoalTracker:
    """Splits the goal into sentences and tracks which ones the episode has done.

    Relevance of an action is its best grounding in a pending sentence, discounted by the number
    of pending *actionable* sentences before it (goals list sub-goals in order). ``vocabulary``
    holds the known verbs and telling goal cues; ``arg_words`` the constant argument words of
    known skills (directions): a sentence with either is actionable.
    """

    def __init__(
        self,
        goal: str,
        vocabulary: set[str] | None = None,
        decay: float = 0.6,
        arg_words: set[str] | None = None,
    ):
        self.goal = goal
        self.sentences = split_sentences(goal)
        self.stems = [set(content_stems(s)) for s in self.sentences]
        self.known_verbs = set(vocabulary) if vocabulary else None
        vocab = (vocabulary or set()) | (arg_words or set())
        self.actionable = [bool(st & vocab) for st in self.stems] if vocab else [True] * len(self.stems)
        self.done = [False] * len(self.sentences)
        self.checks: dict[int, list[str]] = {}
        """Bound effects that must keep holding for a done sentence to stay done."""
        self.decay = decay
        self.steps_since_done = 0
        self.entities: list[str] = []
        """Entity names of the current state (set by the caller each step), for disambiguation."""

    def _g(self, action: str, i: int, cues: dict[str, float], require_verb: bool = False) -> float:
        return grounding(
            action,
            self.stems[i],
            cues,
            sentence_text=self.sentences[i],
            entities=self.entities,
            known_verbs=self.known_verbs,
            require_verb=require_verb,
        )

    def _g_any(self, readings: list[str], i: int, cues: dict[str, float]) -> float:
        """The best grounding of an action's readings; a class reading ("pick up animal") counts
        only where the sentence asks for its verb: "focus on the animal" must not make every
        "pick up <animal>" relevant."""
        return max(self._g(r, i, cues, require_verb=k > 0) for k, r in enumerate(readings))

    @property
    def pending(self) -> list[int]:
        return [i for i, d in enumerate(self.done) if not d and self.actionable[i]]

    def readings(self, action: str, facts: FactBase | None = None) -> list[str]:
        """``action`` and its class readings under this goal (:func:`class_readings`)."""
        return class_readings(action, self.goal, facts)

    def relevance(
        self, action: str, cues: dict[str, float], facts: FactBase | None = None
    ) -> tuple[float, int | None]:
        best, where = 0.0, None
        readings = self.readings(action, facts)
        for rank, i in enumerate(self.pending):
            g = self._g_any(readings, i, cues) * self.decay**rank
            if g > best:
                best, where = g, i
        return best, where

    def observe(
        self,
        action: str,
        changed: bool,
        cues: dict[str, float],
        effects: Sequence[str] = (),
        threshold: float = 0.6,
        facts: FactBase | None = None,
    ) -> int | None:
        """Mark the first pending sentence that ``action`` accomplished (when it changed the state).

        ``effects`` (bound predicates) are remembered: if they stop holding, the sentence is
        pending again (:meth:`revalidate`), e.g. a door re-locked or an item dropped. ``facts``
        (the state the action was taken in) lets an object count as the class the goal names
        (:meth:`readings`).
        """
        self.steps_since_done += 1
        if not changed:
            return None
        readings = self.readings(action, facts)
        for i in self.pending:
            if self._g_any(readings, i, cues) >= threshold:
                self.done[i] = True
                if effects:
                    self.checks[i] = list(effects)
                self.steps_since_done = 0
                return i
        return None

    def revalidate(self, facts: FactBase) -> list[int]:
        """Reopen done sentences whose remembered effects no longer hold; returns them."""
        reopened = []
        for i, preds in list(self.checks.items()):
            sat, tot, _ = match_conditions(preds, facts)
            if sat < tot:
                self.done[i] = False
                del self.checks[i]
                reopened.append(i)
        return reopened

    def defer_first(self) -> int | None:
        """Local replanning: give up on the first pending sentence (it may be done or impossible)."""
        p = self.pending
        if not p:
            return None
        self.done[p[0]] = True
        self.checks.pop(p[0], None)
        self.steps_since_done = 0
        return p[0]

    def next_text(self) -> str:
        p = self.pending
        return self.sentences[p[0]] if p else ""


# --------------------------------------------------------------------------- scoring


def skill_cues(skill: Skill) -> list[str]:
    return [t[4:] for t in skill.tags if t.startswith("cue:")]


def verb_of(template: str) -> str:
    ws = words(SLOT.sub(" ", template))
    return stem(ws[0]) if ws else ""


@dataclass
class SkillMatch:
    """One skill scored against the current state."""

    skill: Skill
    step: int = 0
    binding: dict[str, str] = field(default_factory=dict)
    action: str | None = None
    """The skill's step bound to the state, when it is admissible (or no admissible list exists)."""
    applicability: float = 0.0
    relevance: float = 0.0
    similarity: float = 0.0
    """Hybrid dense + keyword similarity of the skill's text to the query."""
    rerank_score: float | None = None
    """The reranker's score for the skill, when one ran."""
    reliability: float = 0.5
    score: float = 0.0
    applicable: bool = False
    sentence: int | None = None
    reason: str = ""


@dataclass
class GuardrailMatch:
    guardrail: Guardrail
    binding: dict[str, str] = field(default_factory=dict)
    action: str | None = None
    """An admissible action this guardrail would refuse right now (what makes it worth injecting)."""
    applicable: bool = False
    score: float = 0.0
    reason: str = ""


class RetrievalConfig(BaseModel):
    """Cut-offs and weights of :class:`KnowledgeIndex` (``MemoryConfig`` extends it with the agent knobs)."""

    model_config = ConfigDict(extra="forbid")

    min_applicability: float = 0.5
    """Fraction of preconditions that must hold for a skill to count as applicable."""
    min_score: float = 0.3
    """Cut-off of the combined score for injection into the planner."""
    propose_score: float = 0.4
    """Cut-off for executing a skill step as a macro action (propose)."""
    max_candidates: int = 64
    """Dense + keyword prefilter size when the snapshot holds more skills than this."""
    w_goal: float = 0.8
    w_similarity: float = 0.2
    rerank_depth: int | None = Field(None, ge=1)
    """With a reranker: the hybrid search's best this many skills are reranked and its best
    ``max_candidates`` of them matched (retrieve -> rerank; None: ``4 * max_candidates``)."""
    rerank_threshold: float | None = None
    """With a reranker: skills it scores below this are neither injected nor proposed (None: the
    reranker's own ``threshold``, e.g. the calibrated one evolve saved with it, else 0.5)."""
    rerank_weight: float = Field(0.0, ge=0, le=1)
    """With a reranker: a skill's combined score is scaled by ``(1 - w) + w * r / r_max`` (its
    reranker score relative to the step's best), so the order changes and the cut-offs do not.
    0 by default: on TextWorld the memory's own score ranks better than a text-only reranker
    (BENCHMARKS.md, "Memory reranker"), so the reranker filters and is logged, but does not reorder."""


class KnowledgeIndex:
    """An in-memory index over a snapshot of skills and guardrails (what a worker process holds).

    Only knowledge with a status in ``statuses`` is indexed. Dense vectors come from ``embedder``;
    keyword scores from BM25 over the same texts.
    """

    def __init__(
        self,
        skills: Sequence[Skill],
        guardrails: Sequence[Guardrail],
        embedder: Embedder | None = None,
        statuses: Sequence[str | KnowledgeStatus] = ("active",),
        config: RetrievalConfig | None = None,
        reranker: Reranker | None = None,
    ):
        keep = {KnowledgeStatus(s) for s in statuses}
        self.skills = [s for s in skills if s.status in keep and s.steps]
        self.enforcer = GuardrailEnforcer(g for g in guardrails if g.status in keep)
        """Enforces the indexed guardrails (a corrupt pattern is left out: it must never block an agent)."""
        self.guardrails: list[Guardrail] = self.enforcer.guardrails
        self.config = config or RetrievalConfig()
        self.embedder = embedder
        self._step_re: list[list[re.Pattern[str]]] = [
            [template_regex(t, s.slots) for t in s.steps] for s in self.skills
        ]
        self._step_verb: list[list[str]] = [[verb_of(t) for t in s.steps] for s in self.skills]
        # Goal cues per verb, learned from single-step skills: weight = share of that cue's
        # sightings that came with this verb (a word seen with one verb only is fully telling).
        seen: dict[str, Counter[str]] = defaultdict(Counter)
        for s, verbs in zip(self.skills, self._step_verb):
            if len(verbs) != 1 or not verbs[0]:
                continue
            for c in skill_cues(s):
                seen[stem(c)][verbs[0]] += max(1, len(s.provenance))
        self._verb_cues: dict[str, dict[str, float]] = defaultdict(dict)
        for c, by_verb in seen.items():
            total = sum(by_verb.values())
            for v, n in by_verb.items():
                self._verb_cues[v][c] = n / total
        # Words that make a goal sentence actionable: step verbs and telling cues.
        self.vocabulary: set[str] = set()
        for verbs in self._step_verb:
            self.vocabulary.update(v for v in verbs if v)
        for cues in self._verb_cues.values():
            self.vocabulary.update(w for w, wt in cues.items() if wt >= 0.5)
        # Constant argument words of the steps (directions) and values of lexical slots.
        self.arg_words: set[str] = set()
        for s in self.skills:
            for t in s.steps:
                self.arg_words.update(action_parts(SLOT.sub(" ", t))[1])
            for k, vals in s.slots.items():
                if k.startswith(LEXICAL_PREFIX):
                    self.arg_words.update(stem(v) for v in vals)
        # Effects of single-step skills, for checking that a finished goal sentence stays done.
        self._effects: list[tuple[re.Pattern[str], list[str]]] = [
            (regs[0], [v for v in s.verification if v not in ("moved", "score increased")])
            for s, regs in zip(self.skills, self._step_re)
            if len(regs) == 1
        ]
        texts = [s.text() for s in self.skills]
        # Dense + BM25 over the skill texts (the store's hybrid-search parts); with a reranker the
        # best candidates are reranked and their scores land in ``rerank_scores``.
        self.hybrid = HybridScorer(texts, embedder, reranker)
        self.rerank_scores: dict[int, float] = {}

    @property
    def reranker(self) -> Reranker | None:
        return self.hybrid.reranker

    @property
    def rerank_threshold(self) -> float:
        """The reranker score below which a skill is filtered out."""
        if self.config.rerank_threshold is not None:
            return self.config.rerank_threshold
        return float(getattr(self.hybrid.reranker, "threshold", 0.5))

    # -- skills
    def cues_for(self, action: str) -> dict[str, float]:
        """Learned goal words (stem -> weight) for the verb of ``action``."""
        return self._verb_cues.get(action_parts(action)[0], {})

    def effects_for(self, action: str) -> list[str]:
        """Fully bound verification predicates of the single-step skill that ``action`` instantiates."""
        a = norm(action)
        for rx, ver in self._effects:
            m = rx.fullmatch(a)
            if m is None:
                continue
            b = {k: norm(v) for k, v in m.groupdict().items() if v is not None}
            bound = [p for p in bind_predicates(ver, b) if not SLOT.search(p)]
            if bound:
                return bound
        return []

    def similarities(self, query: str) -> np.ndarray:
        """Dense cosine (0..1) blended with normalised BM25 (0.7 / 0.3), per indexed skill."""
        return self.hybrid.scores(query)

    def candidates(self, sims: np.ndarray, query: str | None = None) -> list[int]:
        """Skills worth matching: all when few, else the best by ``sims``. With a reranker and a
        ``query``: the reranker's best ``max_candidates`` of the best ``rerank_depth`` by ``sims``
        (retrieve -> rerank), whose scores go to ``rerank_scores``."""
        k, depth = self.config.max_candidates, self.config.rerank_depth
        rows, self.rerank_scores = self.hybrid.top(sims, k, query, depth=depth)
        return rows

    def match_skill(
        self,
        i: int,
        obs: Observation,
        facts: FactBase,
        tracker: GoalTracker | None,
        similarity: float,
        step: int = 0,
        binding: dict[str, str] | None = None,
        banned: set[str] | None = None,
        by_verb: dict[str, list[str]] | None = None,
        allowed: Callable[[str], bool] | None = None,
    ) -> SkillMatch:
        """Score skill ``i`` at its step ``step`` (0 = a fresh start) in the state ``obs``."""
        s = self.skills[i]
        cfg = self.config
        m = SkillMatch(skill=s, step=step, similarity=similarity, reliability=s.stats.confidence)
        template = s.steps[step]
        regex = self._step_re[i][step]
        base = dict(binding or {})
        if step == 0 and obs.state.location:
            base.setdefault("room", norm(obs.state.location))  # {room} is where the skill starts
        cues = self._verb_cues.get(self._step_verb[i][step], {})
        # Class conditions (what an object is) bind hard, at whichever step binds their slot: a
        # macro's "focus on {obj1}" must take a living thing when the demo's object was one, not
        # whatever "focus on ..." ranks first (in ScienceWorld a wrong focus ends the episode).
        kinds = [p for p in s.preconditions if is_kind_predicate(p)]
        options: list[tuple[str, dict[str, str]]] = []
        admissible = obs.admissible_actions
        if admissible is not None:
            verb = self._step_verb[i][step]
            pool = by_verb.get(verb, []) if by_verb is not None else admissible
            for a in pool:
                mm = regex.fullmatch(norm(a))
                if mm is None:
                    continue
                b = dict(base)
                ok = True
                for k, v in mm.groupdict().items():
                    if k in b and norm(b[k]) != norm(v):
                        ok = False
                        break
                    b[k] = norm(v)
                if ok and (banned is None or norm(a) not in banned) and kinds_hold(kinds, facts, b):
                    options.append((a, b))
        else:
            # No admissible list: bind through the preconditions, then fill the template.
            _, _, b = match_conditions(s.preconditions if step == 0 else [], facts, base)
            text = fill_template(template, b)
            if (
                text is not None
                and (banned is None or norm(text) not in banned)
                and kinds_hold(kinds, facts, b)
            ):
                options.append((text, b))
        if not options:
            m.reason = f"step {step + 1} '{template}' not admissible here" + (
                " (with its class conditions)" if kinds else ""
            )
            return m
        ranked: list[tuple[float, float, int | None, str, dict[str, str]]] = []
        pre = [p for p in s.preconditions if not is_kind_predicate(p)] if step == 0 else []
        for a, b in options[:50]:
            sat, tot, full = match_conditions(pre, facts, b)
            if kinds and not kinds_hold(kinds, facts, full):
                continue
            appl = sat / tot if tot else 1.0
            rel, where = tracker.relevance(a, cues, facts) if tracker is not None else (0.0, None)
            ranked.append((appl, rel, where, a, full))
        if not ranked:
            m.reason = f"step {step + 1} '{template}': no binding meets its class conditions"
            return m
        ranked.sort(key=lambda k: (-k[0], -k[1]))  # stable: the first of equal bindings, as listed
        # The best binding ``allowed`` accepts (checked lazily, best first): a skill must not say
        # "do X" for an X its guardrails refuse (the 1.5B paint episode was shown both).
        best = next((k for k in ranked if allowed is None or allowed(k[3])), None)
        if best is None:
            m.reason = f"step {step + 1} '{template}': every binding is refused by a guardrail here"
            return m
        appl, rel, where, a, full = best
        m.applicability, m.relevance, m.sentence, m.binding = appl, rel, where, full
        m.action = a
        m.applicable = appl >= cfg.min_applicability
        goal_part = cfg.w_goal * rel + cfg.w_similarity * similarity
        # Above the applicability gate a missing precondition costs little: templates over-specify
        # (a door is linked to rooms, a chest is "at" one; both unlock the same way).
        fit = (0.5 + 0.5 * appl) if m.applicable else 0.0
        m.score = fit * goal_part * (0.6 + 0.4 * m.reliability)
        m.reason = (
            f"binds '{a}'; {appl:.0%} of preconditions hold; goal relevance {rel:.2f}; "
            f"similarity {similarity:.2f}; confidence {m.reliability:.2f}"
        )
        return m

    def score_skills(
        self,
        obs: Observation,
        tracker: GoalTracker | None,
        query: str,
        banned: set[str] | None = None,
        allowed: Callable[[str], bool] | None = None,
    ) -> list[SkillMatch]:
        """Every candidate skill scored at its first step, best first (with its reranker score, if any);
        each bound to its best action that ``allowed`` accepts (e.g. no guardrail refuses it)."""
        if not self.skills:
            return []
        facts = FactBase.from_state(obs.state)
        sims = self.similarities(query)
        by_verb: dict[str, list[str]] | None = None
        if obs.admissible_actions is not None:
            by_verb = defaultdict(list)
            for a in obs.admissible_actions:
                by_verb[action_parts(a)[0]].append(a)
        out = []
        cut, w = self.rerank_threshold, self.config.rerank_weight
        rows = self.candidates(sims, query)
        # Relative to the step's best reranker score: the reranker reorders candidates without
        # moving the best one against the absolute min_score / propose_score cut-offs.
        top = max((max(self.rerank_scores.values(), default=0.0), 1e-9))
        for i in rows:
            m = self.match_skill(
                i, obs, facts, tracker, float(sims[i]), banned=banned, by_verb=by_verb, allowed=allowed
            )
            m.rerank_score = self.rerank_scores.get(i)
            if m.rerank_score is not None:  # rerank -> threshold
                m.score *= (1.0 - w) + w * min(max(m.rerank_score / top, 0.0), 1.0)
                if m.rerank_score < cut:
                    m.applicable = False
                    m.reason += f"; reranker {m.rerank_score:.2f} < {cut:.2f}"
                else:
                    m.reason += f"; reranker {m.rerank_score:.2f}"
            out.append(m)
        out.sort(key=lambda m: (-m.score, -m.applicability, m.skill.id))
        return out

    # -- guardrails
    def guardrail_matches(self, obs: Observation, goal: str, limit: int = 200) -> list[GuardrailMatch]:
        """Guardrails whose scope matches and whose trigger holds now, with an admissible action
        they would refuse (those first)."""
        facts = FactBase.from_state(obs.state)
        out: list[GuardrailMatch] = []
        for rule in self.enforcer.rules:
            if not rule.in_scope(goal):
                continue
            g = rule.guardrail
            gm = GuardrailMatch(guardrail=g)
            for a in (obs.admissible_actions or [])[:limit]:
                b = rule.binding(norm(a))
                if b is None:
                    continue
                holds, full = trigger_holds(g.trigger, a, goal, facts, b)
                if holds:
                    gm.action, gm.binding, gm.applicable = a, full, True
                    break
            if not gm.applicable:
                holds, full = trigger_holds(g.trigger, "", goal, facts)
                gm.applicable = holds and bool(g.trigger)
                gm.binding = full
            gm.score = (1.0 if gm.action else 0.5) * g.stats.confidence if gm.applicable else 0.0
            gm.reason = (
                f"would refuse admissible '{gm.action}'"
                if gm.action
                else ("trigger holds" if gm.applicable else "trigger does not hold")
            )
            out.append(gm)
        out.sort(key=lambda m: (-m.score, m.guardrail.id))
        return out

    def check(self, action: str, obs: Observation, goal: str) -> GuardrailVerdict:
        """Enforce the indexed guardrails on ``action`` (see :class:`~evolve.skills.enforce.GuardrailEnforcer`)."""
        return self.enforcer.check(action, obs.state, goal)
