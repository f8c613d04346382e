"""Dual-track distillation: skills from successful segments, guardrails from diagnosed failures.

Skills. Every successful segment (``evolve.diagnose.segments``) of a successful or partially
successful episode is *compacted* first: detours that return to an earlier state are cut, steps
that changed nothing are dropped, and only steps whose effects a later kept step relied on
survive (backward relevance from the progress event). Each kept step becomes an atomic skill and
the whole compact chain a macro skill. Entity names (the arguments of the state's facts, the
inventory, visible objects) become ``{slot}`` variables with their values recorded; other words
stay constant. Preconditions are the state predicates at the start that talk about the entities
the actions touch; verification is the predicate change (and score change) that marked success.
Goal words found next to the entities in the goal text become ``cue:`` tags (how a goal asks
for this skill: "retrieve" for ``take``).

Guardrails. Failure steps of every episode, by diagnosed cause: ``lost`` / ``regression``
(task-scoped: whether an action is fatal depends on the task; a fatal one-object action on
an object the goal did not ask for, ``focus on art studio door`` under "First, focus on the
thermometer.", also gives one env-wide rule, ``not asked_by_goal({obj1})``, see
:func:`evolve.skills.grounding.goal_asks`) and ``precondition_unmet`` /
``invalid_action`` / ``loop`` (subgoal-scoped). The trigger is what *distinguishes* the failing
state from states where the same action template worked (contrast), so a guardrail refuses an
action only where it fails. Info actions that never changed anything across several episodes
become one ``no_effect`` guardrail. A loop of state-changing actions (go north, go south) has no
safe state-level rule, so the cross-check below removes it; loops are mainly handled at run time by
:class:`~evolve.skills.memory.EvolveMemory`'s episodic guard, since a loop is a property of a
history rather than of a state.

A guardrail that would refuse an action a successful episode needed (or any action that made
progress, or that worked in a state where the guardrail claims it cannot) is rejected: see
:func:`harmful_reason`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from evolve.diagnose import (
    diagnose_trajectory,
    diff_states,
    is_info_action,
    segments,
    state_key,
    state_predicates,
)
from evolve.schema import (
    ActionSource,
    EnvState,
    FailureCause,
    Guardrail,
    GuardrailScope,
    KnowledgeStatus,
    Segment,
    Skill,
    Step,
    Trajectory,
    canonical_signature,
)
from evolve.skills.enforce import GuardrailEnforcer
from evolve.skills.grounding import ASKED_BY_GOAL, goal_asks, instruction, split_sentences
from evolve.skills.predicates import (
    CONSTANT_ARGS,
    SLOT,
    FactBase,
    format_predicate,
    goal_kinds,
    is_kind_predicate,
    kind_phrase,
    parse_predicate,
    template_regex,
)
from evolve.text import GROUNDING_STOPWORDS as STOP
from evolve.text import normalise as norm
from evolve.text import stem, words

log = logging.getLogger(__name__)

GUARD_CAUSES = (
    FailureCause.lost,
    FailureCause.regression,
    FailureCause.precondition_unmet,
    FailureCause.invalid_action,
    FailureCause.no_effect,
    FailureCause.loop,
)
# Causes whose rule claims the action cannot work in the trigger state: one execution where it
# did work there refutes the rule.
_CANNOT_WORK = (FailureCause.precondition_unmet, FailureCause.invalid_action, FailureCause.loop)
# Causes that mean the step says nothing about the action itself.
_NOISE_CAUSES = {FailureCause.env_error, FailureCause.policy_error, FailureCause.guardrail_blocked}
MAX_MACRO_STEPS = 10
MAX_ENTITY_LEN = 60


# --------------------------------------------------------------------------- input hygiene


def coerce_trajectories(items: Iterable[Any]) -> tuple[list[Trajectory], list[str]]:
    """Validate inputs: ``Trajectory`` objects, dicts or JSON strings; the bad ones are reported, not used."""
    good: list[Trajectory] = []
    bad: list[str] = []
    for i, it in enumerate(items):
        try:
            if isinstance(it, Trajectory):
                t = it
            elif isinstance(it, (str, bytes)):
                t = Trajectory.model_validate_json(it)
            elif isinstance(it, dict):
                t = Trajectory.model_validate(it)
            else:
                raise TypeError(f"expected a Trajectory, got {type(it).__name__}")
        except (ValidationError, TypeError, ValueError) as e:
            bad.append(f"item {i}: {str(e).splitlines()[0]}")
            continue
        good.append(t)
    if bad:
        log.warning("skipped %d malformed trajectories: %s", len(bad), "; ".join(bad[:3]))
    return good, bad


def _diagnosed(t: Trajectory) -> Trajectory:
    if t.steps and any(s.diagnosis is None for s in t.steps):
        return diagnose_trajectory(t)
    return t


def task_family(task_id: str) -> str:
    """The goal type of a task: its id without the parts that carry numbers (seeds, variations)."""
    parts = [p for p in re.split(r"[-_:]", task_id.lower()) if p and not re.search(r"\d", p)]
    return "-".join(parts) or "task"


# --------------------------------------------------------------------------- entities + templates


def state_entities(state: EnvState) -> set[str]:
    """Names of the things a state talks about: fact arguments, inventory, visible, location."""
    names: set[str] = set()
    for f in state_predicates(state):
        p = parse_predicate(f)
        if p is not None:
            names.update(a for a in p[2] if a not in CONSTANT_ARGS)
    names.update(norm(x) for x in [*state.inventory, *state.visible])
    if state.location:
        names.add(norm(state.location))
    return {
        n
        for n in names
        if n and len(n) <= MAX_ENTITY_LEN and n not in STOP and not SLOT.search(n) and re.search("[a-z]", n)
    }


def mentions(action: str, entities: Iterable[str]) -> list[tuple[int, int, str]]:
    """Entity mentions in ``action`` (longest names first, whole words), in text order."""
    a = norm(action)
    taken = [False] * len(a)
    out: list[tuple[int, int, str]] = []
    for e in sorted(set(entities), key=len, reverse=True):
        for m in re.finditer(r"(?<![a-z0-9])" + re.escape(e) + r"(?![a-z0-9])", a):
            if any(taken[m.start() : m.end()]):
                continue
            for k in range(m.start(), m.end()):
                taken[k] = True
            out.append((m.start(), m.end(), e))
    return sorted(out)


@dataclass
class SlotMap:
    """Entity -> slot name, shared by all steps of one chain (same entity, same slot)."""

    slot_of: dict[str, str] = field(default_factory=dict)
    n: int = 0

    def slot(self, entity: str) -> str:
        if entity not in self.slot_of:
            self.n += 1
            self.slot_of[entity] = f"obj{self.n}"
        return self.slot_of[entity]

    def set_room(self, room: str | None) -> None:
        if room and norm(room) not in self.slot_of:
            self.slot_of[norm(room)] = "room"


def templatize(action: str, entities: Iterable[str], slots: SlotMap) -> tuple[str, list[str]]:
    """``"unlock safe with key"`` -> ``("unlock {obj1} with {obj2}", ["safe", "key"])``."""
    a = norm(action)
    out, pos, used = [], 0, []
    for start, end, e in mentions(a, entities):
        out.append(a[pos:start])
        out.append("{" + slots.slot(e) + "}")
        used.append(e)
        pos = end
    out.append(a[pos:])
    return "".join(out), used


def template_predicate(pred: str, slots: SlotMap) -> str | None:
    """A fact with every argument replaced by its slot; None when an argument is not in the chain."""
    p = parse_predicate(pred)
    if p is None:
        return None
    neg, name, args = p
    out = []
    for a in args:
        if a in CONSTANT_ARGS:
            out.append(a.upper())
        elif a in slots.slot_of:
            out.append("{" + slots.slot_of[a] + "}")
        else:
            return None
    return format_predicate(name, out, neg)


def context_predicates(state: EnvState, entities: Sequence[str], slots: SlotMap) -> list[str]:
    """Facts of ``state`` about ``entities`` (every argument an entity, the room, or a constant)."""
    ents = {norm(e) for e in entities}
    out: list[str] = []
    for f in state_predicates(state):
        p = parse_predicate(f)
        if p is None or not (set(p[2]) & ents):
            continue
        t = template_predicate(f, slots)
        if t is not None:
            out.append(t)
    return list(dict.fromkeys(out))


def _changed(step: Step) -> bool:
    d = diff_states(step.pre_state.state, step.post_state.state)
    return not d.empty


# --------------------------------------------------------------------------- compact chains


def compact_chain(traj: Trajectory, seg: Segment) -> list[int]:
    """Indices (into ``traj.steps``) of the steps of ``seg`` that the progress at its end needed.

    1. Detours are cut: whenever the state before a step recurs later, the steps in between are
       dropped (the agent came back to where it was).
    2. Steps that changed nothing are dropped (the last step, the progress event, is always kept).
    3. Backward relevance: a step is kept when a fact it added (or the room it moved to) was part
       of the context of a kept later step, and no step in between added it again.
    """
    idx = list(range(seg.start, min(seg.end, len(traj.steps))))
    if not idx:
        return []
    steps = traj.steps
    keys = [state_key(steps[i].pre_state) for i in idx]
    last_at: dict[str, int] = {}
    for pos, k in enumerate(keys):
        last_at[k] = pos
    kept: list[int] = []
    pos = 0
    while pos < len(idx):
        jump = last_at.get(keys[pos], pos)
        pos = max(pos, jump)
        kept.append(idx[pos])
        pos += 1
    final = kept[-1]
    kept = [i for i in kept if i == final or _changed(steps[i])]
    # Backward relevance over facts (and location) provided/consumed.
    needed: list[int] = [final]
    wanted: set[str] = set(_context_raw(steps[final]))
    for i in reversed(kept[:-1]):
        pre, post = steps[i].pre_state.state, steps[i].post_state.state
        added = set(state_predicates(post)) - set(state_predicates(pre))
        if post.location != pre.location and post.location:
            added.add(f"@{norm(post.location)}")
        if added & wanted:
            needed.append(i)
            wanted -= added
            wanted |= set(_context_raw(steps[i]))
    return sorted(needed)


def _context_raw(step: Step) -> list[str]:
    """Untemplated facts a step depends on: facts about its entities, and where it happened."""
    st = step.pre_state.state
    ents = {e for _, _, e in mentions(step.action.text, state_entities(st))}
    out = [f for f in state_predicates(st) if (p := parse_predicate(f)) and set(p[2]) & ents]
    if st.location:
        out.append(f"@{norm(st.location)}")
    return out


# --------------------------------------------------------------------------- goal cues


def goal_cues(action: str, goal: str, window_before: int = 2, window_after: int = 1) -> list[str]:
    """Goal words next to the action's arguments in the sentence that asks for it."""
    ws = words(action)
    if len(ws) < 2:
        return []
    args = {stem(w) for w in ws[1:] if w not in STOP}
    verb = stem(ws[0])
    if not args:
        return []
    best: list[str] | None = None
    for sent in split_sentences(goal):
        toks = [w for w in words(sent) if w not in STOP]
        stems_ = [stem(w) for w in toks]
        if not args <= set(stems_):
            continue
        pos = [k for k, s in enumerate(stems_) if s in args]
        lo, hi = min(pos), max(pos)
        around = toks[max(0, lo - window_before) : lo] + toks[hi + 1 : hi + 1 + window_after]
        cues = [w for w in around if len(w) >= 3 and stem(w) not in args and not w.isdigit()]
        if verb in stems_:
            cues.append(ws[0])
        if best is None or verb in stems_:
            best = cues
        if verb in stems_:
            break
    return list(dict.fromkeys(best or []))


# --------------------------------------------------------------------------- skills


@dataclass
class _SkillAcc:
    steps: list[str]
    preconditions: list[str]
    verification: list[str]
    family: str
    env: str
    kind: str
    slots: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    cues: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    provenance: list[str] = field(default_factory=list)


def _verification(pre: EnvState, post: EnvState, slots: SlotMap, entities: Sequence[str]) -> list[str]:
    d = diff_states(pre, post)
    ents = {norm(e) for e in entities}
    out: list[str] = []
    for f, neg in [(f, False) for f in d.facts_added] + [(f, True) for f in d.facts_removed]:
        p = parse_predicate(f)
        if p is None or not (set(p[2]) & ents) or is_kind_predicate(f):
            continue  # class facts come and go with what is in view: no effect of the action
        t = template_predicate(f, slots)
        if t is not None:
            out.append(("not " if neg else "") + t)
    if not d.facts_added and not d.facts_removed:
        # Envs without facts: inventory changes are the effect.
        for item in d.inventory_added:
            if norm(item) in ents:
                out.append(f"has({{{slots.slot(norm(item))}}})")
        for item in d.inventory_removed:
            if norm(item) in ents:
                out.append(f"not has({{{slots.slot(norm(item))}}})")
    if d.location_from != d.location_to:
        out.append("moved")
    if d.score_delta > 0:
        out.append("score increased")
    return list(dict.fromkeys(out))


def _skill_key(acc_steps: list[str], pre: list[str], ver: list[str], family: str) -> tuple[Any, ...]:
    return (tuple(acc_steps), tuple(sorted(pre)), tuple(sorted(ver)), family)


def skill_signature(preconditions: Sequence[str], family: str, steps: Sequence[str]) -> str:
    """canonical_signature(preconditions + goal type); the step verbs keep unrelated skills apart."""
    verbs = " ".join(w for t in steps for w in words(SLOT.sub(" ", t))[:1])
    return canonical_signature(list(preconditions), extra=f"{family}|{verbs}")


def distill_skills(
    trajectories: Iterable[Trajectory | dict[str, Any] | str],
    *,
    namespace: str = "default",
    env: str | None = None,
    min_support: int = 1,
    atomic: bool = True,
    macros: bool = True,
    max_macro_steps: int = MAX_MACRO_STEPS,
) -> list[Skill]:
    """Skills (status ``candidate``) from the successful segments of ``trajectories``.

    Identical instances (same templates, preconditions, verification, goal type) are pooled:
    provenance and slot values are unioned. ``min_support`` is the number of distinct source
    episodes a skill needs.
    """
    trajs, _ = coerce_trajectories(trajectories)
    acc: dict[tuple[Any, ...], _SkillAcc] = {}
    vocabulary = kind_vocabulary(trajs)
    for t in trajs:
        if env and t.env != env:
            continue
        if not t.steps:
            continue
        family = task_family(t.task_id)
        for seg in segments(t):
            if not seg.succeeded:
                continue
            chain = compact_chain(t, seg)
            if not chain:
                continue
            # Atomic skills: each kept step with its own context.
            if atomic:
                for i in chain:
                    _add_instance(acc, t, [i], family, "atomic", vocabulary)
            if macros and 2 <= len(chain) <= max_macro_steps:
                _add_instance(acc, t, chain, family, "macro", vocabulary)
    out: list[Skill] = []
    for a in acc.values():
        support = len(set(a.provenance))
        if support < min_support:
            continue
        out.append(_make_skill(a, namespace, support))
    return out


def _add_instance(
    acc: dict[tuple[Any, ...], _SkillAcc],
    t: Trajectory,
    chain: list[int],
    family: str,
    kind: str,
    vocabulary: dict[str, str] | None = None,
) -> None:
    steps = [t.steps[i] for i in chain]
    if any(not s.action.text.strip() or "{" in s.action.text or "}" in s.action.text for s in steps):
        return
    first = steps[0].pre_state.state
    slots = SlotMap()
    slots.set_room(first.location)
    templates: list[str] = []
    ents_per_step: list[list[str]] = []
    for s in steps:
        tmpl, used = templatize(s.action.text, state_entities(s.pre_state.state), slots)
        templates.append(tmpl)
        ents_per_step.append(used)
    all_ents = [e for es in ents_per_step for e in es]
    # Preconditions: facts true at the start about the entities some step touches, which that
    # step still found true (facts a chain step produces itself are no precondition).
    start_ctx = context_predicates(first, all_ents, slots)
    used_ctx: dict[str, None] = {}
    for s, es in zip(steps, ents_per_step):
        used_ctx.update(dict.fromkeys(context_predicates(s.pre_state.state, es, slots)))
    pre = [p for p in start_ctx if p in used_ctx and not is_kind_predicate(p)]
    # Class facts come from the step that touched the entity (a demo's dove is not in view at the
    # chain's start), narrowed to the class the goal asks for (see goal_kind_conditions).
    pre += goal_kind_conditions([p for p in used_ctx if is_kind_predicate(p)], t.goal, vocabulary)
    ver = _verification(first, steps[-1].post_state.state, slots, all_ents)
    if kind == "atomic" and any(v != "score increased" for v in ver):
        # Whether this step happened to close the segment is incidental to what the step does;
        # unless scoring is all it does (ScienceWorld's decisive "focus on X").
        ver = [v for v in ver if v != "score increased"]
    if not ver:
        return  # nothing observable marks success: not a skill we could verify
    key = _skill_key(templates, pre, ver, family)
    a = acc.get(key)
    if a is None:
        a = acc[key] = _SkillAcc(templates, pre, ver, family, t.env, kind)
    for e, slot in slots.slot_of.items():
        if slot != "room" or any("{room}" in x for x in [*templates, *pre]):
            a.slots[slot].add(e)
    for s in steps:
        for c in goal_cues(s.action.text, t.goal):
            a.cues[c.lower()] += 1
    a.provenance.append(t.id)


def _by_slot(kind_preds: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """Positive one-slot class predicates grouped by their argument: ``{"{obj1}": [(pred, phrase)]}``."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for f in kind_preds:
        p = parse_predicate(f)
        if p is None or p[0] or len(p[2]) != 1:
            continue
        phrase = kind_phrase(p[1])
        if phrase is not None:
            out[p[2][0]].append((f, phrase))
    return out


def kind_vocabulary(trajs: Iterable[Trajectory]) -> dict[str, str]:
    """Every class phrase the states of ``trajs`` use, with its predicate name (``"living thing":
    "is_living_thing"``): the classes a goal can name, wanted or not."""
    out: dict[str, str] = {}
    for t in trajs:
        for s in t.steps:
            for f in s.pre_state.state.facts:
                name = f.split("(", 1)[0].strip()
                phrase = kind_phrase(name)
                if phrase is not None:
                    out.setdefault(phrase, name)
    return out


def goal_kind_conditions(
    kind_preds: Sequence[str], goal: str, vocabulary: dict[str, str] | None = None
) -> list[str]:
    """The class conditions a skill keeps for its slots: what the goal asks for, not what the demo
    happened to use.

    Per slot: the classes of its entity that the goal names ("find a(n) living thing": the dove's
    ``is_living_thing``, not ``type_dove``); when the goal names a class as unwanted ("non-living
    thing", from the ``vocabulary`` of class phrases the experience knows), its negation; otherwise
    the entity's categories without its own type (a type is the object's name in disguise:
    ``type_dove`` would bind the skill to doves only).
    """
    out: list[str] = []
    vocab = dict(vocabulary or {})
    for arg, items in _by_slot(kind_preds).items():
        phrases = {ph for _, ph in items}
        wanted, _ = goal_kinds(goal, phrases)
        _, unwanted = goal_kinds(goal, set(vocab) | phrases)
        named = [f for f, ph in items if ph in wanted]
        if named:
            out += named
        elif unwanted - phrases:
            out += [f"not {vocab[u]}({arg})" for u in sorted(unwanted - phrases) if u in vocab]
        else:
            out += [f for f, _ in items if f.startswith("is_")]
    return list(dict.fromkeys(out))


def fatal_kind_trigger(
    kinds: Sequence[str],
    successes: Sequence[set[str]],
    goal: str,
    template: str,
    vocabulary: dict[str, str],
    arg: str = "{obj1}",
) -> list[str]:
    """The trigger of a guardrail against a fatal one-object action (a wrong ``focus on`` ends a
    ScienceWorld episode), over what the object *is* rather than its name or where it was.

    ``kinds``: the failed object's class facts, templated (``is_portal({obj1})``); ``arg``: its
    slot; ``successes``: the class facts of the objects this action template worked on in the
    same task type. First choice that says something:

    1. the categories every success had and this object lacks, negated (``not is_living_thing``:
       refuse anything that is not a living thing);
    2. this object's classes no success had (``type_bee``: refuse bees);
    3. without successes, the goal, when it asks for this action once: the class its instruction
       names and the object lacks, negated, or the class it names as unwanted and the object has;
    4. the object's classes (its type: refuse objects of the same type).

    Empty when successes exist and nothing tells this object from them (no safe rule).
    """
    fail = set(kinds)
    if successes:
        common = set.intersection(*[set(x) for x in successes])
        negated = [f"not {k}" for k in sorted(common) if k.startswith("is_") and k not in fail]
        if negated:
            return negated
        seen = set().union(*successes)
        return [k for k in kinds if k not in seen]
    verb = SLOT.split(template)[0].strip()
    asks = [x for x in split_sentences(goal) if verb and verb in norm(x)]
    if len(asks) == 1:
        wanted, unwanted = goal_kinds(instruction(goal), set(vocabulary))
        have = {ph for _, ph in _by_slot(kinds).get(arg, [])}
        if wanted and not wanted & have:
            return [f"not {vocabulary[w]}({arg})" for w in sorted(wanted)]
        if unwanted & have:
            return [f"{vocabulary[u]}({arg})" for u in sorted(unwanted & have)]
    return list(kinds)


def content_id(prefix: str, namespace: str, *parts: object) -> str:
    """An id that is a function of what the item says (not a random uuid), so that the same
    trajectories distill to the same ids in every run: the store lists knowledge by id and retrieval
    breaks score ties by id, so random ids made runs of the same job differ by a few episodes."""
    payload = json.dumps([namespace, *parts], sort_keys=True, default=str, separators=(",", ":"))
    return f"{prefix}-{hashlib.sha1(payload.encode()).hexdigest()[:16]}"


def _make_skill(a: _SkillAcc, namespace: str, support: int) -> Skill:
    verbs = [w for tmpl in a.steps for w in words(SLOT.sub(" ", tmpl))[:1]]
    name = " -> ".join(a.steps)
    if len(name) > 120:
        name = name[:117] + "..."
    effects = ", ".join(v for v in a.verification[:4])
    cue_words = sorted(a.cues, key=lambda c: (-a.cues[c], c))[:8]
    desc = f"{' then '.join(dict.fromkeys(verbs))} ({a.kind}); afterwards {effects}; seen in {support} episode(s)"
    if cue_words:
        desc += f"; goals ask for it with: {', '.join(cue_words)}"
    slots = {
        k: sorted(v)
        for k, v in a.slots.items()
        if any("{" + k + "}" in x for x in [*a.steps, *a.preconditions, *a.verification])
    }
    signature = skill_signature(a.preconditions, a.family, a.steps)
    return Skill(
        id=content_id("skill", namespace, signature, a.steps, a.preconditions, a.verification),
        namespace=namespace,
        env=a.env,
        name=name,
        description=desc,
        preconditions=list(a.preconditions),
        steps=list(a.steps),
        slots=slots,
        verification=list(a.verification),
        signature=signature,
        tags=[a.kind, f"family:{a.family}"] + [f"cue:{c}" for c in cue_words],
        status=KnowledgeStatus.candidate,
        provenance=list(dict.fromkeys(a.provenance)),
    )


# --------------------------------------------------------------------------- guardrails


def needed_steps(traj: Trajectory) -> list[int]:
    """Steps a successful (or partially successful) episode relied on: compact chains of its
    successful segments, every step that raised the score, and every oracle step."""
    out: set[int] = set()
    for seg in segments(traj):
        if seg.succeeded:
            out.update(compact_chain(traj, seg))
    for i, s in enumerate(traj.steps):
        if s.post_state.state.score > s.pre_state.state.score:
            out.add(i)
        if traj.success and s.action.source == ActionSource.oracle:
            out.add(i)
    return sorted(out)


def _template_step(step: Step) -> tuple[str, SlotMap, list[str]]:
    st = step.pre_state.state
    slots = SlotMap()
    slots.set_room(st.location)
    tmpl, used = templatize(step.action.text, state_entities(st), slots)
    return tmpl, slots, used


def _location_trigger(state: EnvState) -> list[str]:
    """For entity-less actions: where it happened, with the room name kept constant."""
    if not state.location:
        return []
    loc = norm(state.location)
    return [
        f for f in state_predicates(state) if (p := parse_predicate(f)) and loc in p[2] and len(p[2]) <= 2
    ][:1]


def goal_pattern(goal: str, avoid: Iterable[str] = ()) -> str:
    """A regex over goals of the same type: lookaheads for up to 3 telling words of the goal's
    first instruction sentence (entity names left out, since they vary between tasks).

    Each telling word is anchored to the word before it: "find a(n) living thing" and "find a(n)
    non-living thing" share every long word, and a fatal-action rule of one task type must not
    be in scope for its opposite (``n living`` vs ``non living``).
    """
    bad = {norm(a) for a in avoid}
    bad_words = {w for a in bad for w in words(a)}
    toks = words(instruction(goal))
    out: list[str] = []
    seen: set[str] = set()
    for i, w in enumerate(toks):
        if w in STOP or len(w) <= 3 or w in bad or w in {"task", "your", "goal"} or w in seen:
            continue
        seen.add(w)
        prev = toks[i - 1] if i > 0 else ""
        head = f"\\b{re.escape(prev)}\\W+" if prev and prev not in bad_words else "\\b"
        out.append(f"(?=.*{head}{re.escape(w)})")
        if len(out) == 3:
            break
    return "".join(out)


@dataclass
class _GuardAcc:
    cause: FailureCause
    forbidden: str
    trigger: list[str]
    scope: GuardrailScope
    task_pattern: str
    env: str
    evidence: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)


def _executions(trajs: Sequence[Trajectory]) -> dict[str, list[set[str]]]:
    """Contexts (templated facts) where each action template *worked*: changed the state with no
    failure cause."""
    out: dict[str, list[set[str]]] = defaultdict(list)
    for t in trajs:
        for s in t.steps:
            if not _changed(s):
                continue
            if s.diagnosis and any(c.cause in (*GUARD_CAUSES, *_NOISE_CAUSES) for c in s.diagnosis.causes):
                continue
            tmpl, slots, used = _template_step(s)
            out[tmpl].append(set(context_predicates(s.pre_state.state, used, slots)))
    return out


def _kind_executions(trajs: Sequence[Trajectory]) -> dict[tuple[str, str], list[set[str]]]:
    """Per (task type, action template): the class facts of the objects it *worked* on (changed
    the state with no failure cause), for contrasting a fatal choice with the right ones."""
    out: dict[tuple[str, str], list[set[str]]] = defaultdict(list)
    for t in trajs:
        family = task_family(t.task_id)
        for s in t.steps:
            if not _changed(s) or s.post_state.state.lost:
                continue
            if s.diagnosis and any(c.cause in (*GUARD_CAUSES, *_NOISE_CAUSES) for c in s.diagnosis.causes):
                continue
            tmpl, slots, used = _template_step(s)
            if len(set(used)) != 1:
                continue
            kinds = {f for f in context_predicates(s.pre_state.state, used, slots) if is_kind_predicate(f)}
            if kinds:
                out[(family, tmpl)].append(kinds)
    return out


def _note(
    acc: dict[tuple[Any, ...], _GuardAcc],
    t: Trajectory,
    s: Step,
    cause: FailureCause,
    forbidden: str,
    trigger: list[str],
    scope: GuardrailScope,
    pattern: str,
) -> None:
    """Count failure step ``s`` of ``t`` for the guardrail ``(cause, forbidden, trigger, pattern)``."""
    key = (cause, forbidden, tuple(sorted(trigger)), pattern)
    g = acc.get(key)
    if g is None:
        g = acc[key] = _GuardAcc(cause, forbidden, trigger, scope, pattern, t.env)
    g.provenance.append(t.id)
    g.evidence.append(
        next((c.evidence for c in s.diagnosis.causes if c.cause == cause), "") if s.diagnosis else ""
    )


def distill_guardrails(
    trajectories: Iterable[Trajectory | dict[str, Any] | str],
    *,
    namespace: str = "default",
    env: str | None = None,
    min_support: int = 1,
    info_min_support: int = 3,
    check_harm: bool = True,
) -> tuple[list[Guardrail], list[tuple[Guardrail, str]]]:
    """Guardrails (status ``candidate``) from failure steps, and the ones rejected as harmful with why.

    ``min_support``: distinct episodes needed (``lost``/``regression`` need one: they are costly);
    ``info_min_support``: no-effect occurrences needed before info actions are refused.
    """
    trajs, _ = coerce_trajectories(trajectories)
    trajs = [_diagnosed(t) for t in trajs if (not env or t.env == env) and t.steps]
    worked = _executions(trajs)
    worked_kinds = _kind_executions(trajs)
    vocabulary = kind_vocabulary(trajs)
    acc: dict[tuple[Any, ...], _GuardAcc] = {}
    info_fail: dict[str, list[str]] = defaultdict(list)
    for t in trajs:
        for s in t.steps:
            if s.diagnosis is None or not s.action.text.strip():
                continue
            causes = {c.cause for c in s.diagnosis.causes}
            if causes & _NOISE_CAUSES:
                continue
            cause = next((c for c in GUARD_CAUSES if c in causes), None)
            if cause is None:
                continue
            tmpl, slots, used = _template_step(s)
            if "{" in s.action.text or "}" in s.action.text:
                continue
            if cause == FailureCause.no_effect:
                if is_info_action(s.action.text):
                    info_fail[tmpl].append(t.id)
                continue  # other no-effect steps are state-specific noise; loops are episodic
            st = s.pre_state.state
            ctx = context_predicates(st, used, slots)
            succ = worked.get(tmpl, [])
            kinds = [f for f in ctx if is_kind_predicate(f)]
            fatal = cause in (FailureCause.lost, FailureCause.regression)
            right = worked_kinds.get((task_family(t.task_id), tmpl), [])
            trigger: list[str] = []
            if fatal and kinds and len(set(used)) == 1:
                slot = slots.slot_of.get(used[0]) or slots.slot(norm(used[0]))
                if not goal_asks(s.action.text, t.goal, FactBase.from_state(st)):
                    # Whatever the task: the goal did not ask for this action on this object.
                    asked = [f"not {ASKED_BY_GOAL}({{{slot}}})"]
                    _note(
                        acc, t, s, cause, template_regex(tmpl, {}).pattern, asked, GuardrailScope.subgoal, ""
                    )
                # What the object is decides a fatal choice, not where it was or its name.
                trigger = fatal_kind_trigger(kinds, right, t.goal, tmpl, vocabulary, "{" + slot + "}")
                if not trigger:
                    continue  # it is of the same classes as objects this action worked on
            if trigger:
                pass  # a class rule
            elif succ:
                # Contrast: facts here that no successful execution had, else facts every success had
                # that are missing here (as negations).
                seen = set().union(*succ)
                trigger = [f for f in ctx if f not in seen]
                if not trigger:
                    common = set.intersection(*succ)
                    trigger = [f"not {f}" for f in sorted(common) if f not in ctx]
                if not trigger and not used:
                    trigger = _location_trigger(st)
                if not trigger:
                    continue  # nothing tells this failure from the successes: no safe rule
            else:
                trigger = ctx if used else _location_trigger(st)
            task_scoped = cause in (FailureCause.lost, FailureCause.regression)
            scope = GuardrailScope.task if task_scoped else GuardrailScope.subgoal
            pattern = goal_pattern(t.goal, avoid=used) if task_scoped else ""
            _note(acc, t, s, cause, template_regex(tmpl, {}).pattern, trigger, scope, pattern)
    for tmpl, prov in info_fail.items():
        if len(prov) < info_min_support or worked.get(tmpl):
            continue
        forbidden = template_regex(tmpl, {}).pattern
        g = _GuardAcc(
            FailureCause.no_effect,
            forbidden,
            [],
            GuardrailScope.subgoal,
            "",
            "",
            evidence=[f"'{tmpl}' changed nothing in {len(prov)} tries and never changed the state"],
        )
        g.env = next((t.env for t in trajs if t.id in set(prov)), "")
        g.provenance = prov
        acc[("info", forbidden)] = g

    out: list[Guardrail] = []
    rejected: list[tuple[Guardrail, str]] = []
    successes = [t for t in trajs if any(seg.succeeded for seg in segments(t))]
    for g in acc.values():
        support = len(set(g.provenance))
        need = 1 if g.cause in (FailureCause.lost, FailureCause.regression) else min_support
        if support < need:
            continue
        guard = _make_guardrail(g, namespace)
        why = harmful_reason(guard, successes, trajs) if check_harm else None
        if why:
            rejected.append((guard, why))
        else:
            out.append(guard)
    return out, rejected


def _make_guardrail(g: _GuardAcc, namespace: str) -> Guardrail:
    when = "; ".join(g.trigger) or "always"
    readable = re.sub(r"\(\?P<(\w+)>\.\+\?\)", r"{\1}", g.forbidden).replace(r"\s+", " ").replace("\\", "")
    desc = f"'{readable}' failed ({g.cause.value}) when {when}, in {len(set(g.provenance))} episode(s)"
    if g.evidence and g.evidence[0]:
        desc += f"; e.g. {g.evidence[0][:140]}"
    signature = canonical_signature([*g.trigger, g.forbidden], extra=f"{g.cause.value}|{g.task_pattern}")
    return Guardrail(
        id=content_id("guard", namespace, signature, g.scope.value, g.forbidden, g.trigger),
        namespace=namespace,
        env=g.env,
        root_cause=g.cause,
        description=desc,
        trigger=list(g.trigger),
        forbidden_action=g.forbidden,
        scope=g.scope,
        task_pattern=g.task_pattern,
        signature=signature,
        status=KnowledgeStatus.candidate,
        provenance=list(dict.fromkeys(g.provenance)),
    )


def refuses(guardrail: Guardrail, action: str, state: EnvState, goal: str = "") -> bool:
    """True when ``guardrail`` would refuse ``action`` in ``state`` (regex, trigger and scope).

    One-off convenience; to check many actions, build one :class:`GuardrailEnforcer` and reuse it.
    """
    return GuardrailEnforcer([guardrail]).refuses(action, state, goal)


def harmful_reason(
    guardrail: Guardrail, successes: Sequence[Trajectory], experience: Sequence[Trajectory] = ()
) -> str | None:
    """Why ``guardrail`` must not exist, or None when it is safe as far as experience shows.

    It is harmful when it would refuse (a) a step a successful segment needed, (b) any step that
    raised the score, or, for precondition/invalid/loop rules, (c) any step where that action in
    fact worked (so the rule's claim is false there).
    """
    enforcer = GuardrailEnforcer([guardrail])
    if not len(enforcer):
        return None  # a pattern that does not compile refuses nothing
    for t in successes:
        for i in needed_steps(t):
            s = t.steps[i]
            if enforcer.refuses(s.action.text, s.pre_state.state, t.goal):
                return f"would refuse '{s.action.text}', needed at step {i} of successful episode {t.id}"
    for t in experience:
        for i, s in enumerate(t.steps):
            progressed = s.post_state.state.score > s.pre_state.state.score or (
                s.post_state.state.won and not s.pre_state.state.won
            )
            worked = (
                guardrail.root_cause in _CANNOT_WORK
                and _changed(s)
                and not (
                    s.diagnosis
                    and s.diagnosis.failed
                    and any(c.cause in GUARD_CAUSES for c in s.diagnosis.causes)
                )
            )
            if (progressed or worked) and enforcer.refuses(s.action.text, s.pre_state.state, t.goal):
                what = "made progress" if progressed else "worked"
                return f"would refuse '{s.action.text}', which {what} at step {i} of episode {t.id}"
    return None


# --------------------------------------------------------------------------- both tracks


@dataclass
class DistillResult:
    skills: list[Skill]
    guardrails: list[Guardrail]
    rejected: list[tuple[Guardrail, str]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def distill(
    trajectories: Iterable[Trajectory | dict[str, Any] | str],
    *,
    namespace: str = "default",
    env: str | None = None,
    min_support: int = 1,
    macros: bool = True,
) -> DistillResult:
    """Both tracks over one batch of experience (nothing is written anywhere)."""
    trajs, bad = coerce_trajectories(trajectories)
    trajs = [_diagnosed(t) for t in trajs]
    skills = distill_skills(trajs, namespace=namespace, env=env, min_support=min_support, macros=macros)
    guards, rejected = distill_guardrails(trajs, namespace=namespace, env=env, min_support=min_support)
    return DistillResult(skills, guards, rejected, bad)


def bound_steps(skill: Skill, binding: dict[str, str]) -> list[str]:
    """The skill's steps with the bound slots filled (unbound ones left as ``{slot}``)."""
    return [SLOT.sub(lambda m: binding.get(m.group(1), m.group(0)), s) for s in skill.steps]
