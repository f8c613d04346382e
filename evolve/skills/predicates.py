"""Templated predicates and actions: parsing, unification against a state's facts, binding.

Knowledge speaks in templated predicates (``in({obj1}, I)``, ``locked({obj2})``) and templated
actions (``unlock {obj2} with {obj1}``). Applying it means *binding* slots to what the current
state holds: :func:`match_conditions` finds the best existential match of predicates against a
:class:`FactBase`; :func:`template_regex` turns a templated action into a full-match regex whose
named groups bind the slots. Distillation, retrieval and the guardrail enforcer all use these.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from evolve.diagnose import state_predicates
from evolve.schema import EnvState
from evolve.text import normalise as norm

# Arguments every state shares (TextWorld's player and inventory): never generalised into slots.
CONSTANT_ARGS = frozenset({"p", "i"})
SLOT = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_PRED = re.compile(r"^\s*(not\s+)?([A-Za-z_][\w\-]*)\s*\((.*)\)\s*$", re.DOTALL)
# Slots that stand for words (directions, verbs' objects that are no entity) and may only take
# the values they were seen with; entity slots take any name the state offers.
LEXICAL_PREFIX = "w"

Pred = tuple[bool, str, tuple[str, ...]]

KIND_PREFIXES = ("is_", "type_")
"""Class predicates: ``is_<category>(x)`` (``is_living_thing(dove)``) and ``type_<class>(x)``
(``type_dove(dove)``), from envs that know what their objects are (ScienceWorld's object classes).
What an object *is* never changes, so memory treats them differently from other facts: they are
hard constraints on a skill's slot wherever in a chain it gets bound, and a fatal action's
guardrail generalises over them rather than over the object's name."""


def kind_phrase(name: str) -> str | None:
    """``is_living_thing`` -> ``living thing``; None for a predicate name that is no class predicate."""
    for prefix in KIND_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :].replace("_", " ")
    return None


def is_kind_predicate(text: str) -> bool:
    """Is ``text`` a one-argument class predicate, or its negation (``is_animal({obj1})``,
    ``not is_living_thing({obj1})``)?"""
    p = parse_predicate(text)
    return p is not None and len(p[2]) == 1 and kind_phrase(p[1]) is not None


def kinds_hold(conditions: Sequence[str], facts: FactBase, binding: dict[str, str]) -> bool:
    """Do the class conditions among ``conditions`` whose slot ``binding`` binds all hold?

    Class conditions on slots not bound yet are left for the step that binds them."""
    for c in conditions:
        p = parse_predicate(c)
        if p is None or len(p[2]) != 1 or kind_phrase(p[1]) is None:
            continue
        m = SLOT.fullmatch(p[2][0])
        value = binding.get(m.group(1)) if m else p[2][0]
        if value is None:
            continue
        hit = (norm(value),) in facts.by_name.get(p[1], ())
        if hit == p[0]:  # a positive condition without the fact, or a negated one with it
            return False
    return True


def goal_kinds(goal: str, phrases: Iterable[str]) -> tuple[set[str], set[str]]:
    """The class phrases a goal names: ``(wanted, unwanted)``. ``"find a(n) non-living thing"``
    names ``living thing`` as unwanted; ``"the animal with the longest life span"`` names
    ``animal`` as wanted (plurals count)."""
    wanted: set[str] = set()
    unwanted: set[str] = set()
    text = goal.lower()
    for phrase in set(phrases):
        words_ = phrase.split()
        if not words_:
            continue
        body = r"\s+".join(re.escape(w) for w in words_)
        for m in re.finditer(rf"(?<![\w-])(non-|not\s+|no\s+)?{body}(?:s|es)?(?![\w-])", text):
            (unwanted if m.group(1) else wanted).add(phrase)
    return wanted, unwanted


def parse_predicate(text: str) -> Pred | None:
    """``"not at(P, {room})"`` -> ``(True, "at", ("p", "{room}"))``; None when it is no predicate."""
    m = _PRED.match(text)
    if not m:
        return None
    args = tuple(norm(a) for a in m.group(3).split(",")) if m.group(3).strip() else ()
    return bool(m.group(1)), m.group(2).lower(), args


def format_predicate(name: str, args: Sequence[str], negated: bool = False) -> str:
    return ("not " if negated else "") + f"{name}({', '.join(args)})"


class FactBase:
    """The facts of one state, indexed by predicate name, for fast unification."""

    def __init__(self, facts: Iterable[str]):
        self.by_name: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        self.facts: set[tuple[str, tuple[str, ...]]] = set()
        for f in facts:
            p = parse_predicate(f)
            if p is None or p[0]:
                continue
            key = (p[1], p[2])
            if key not in self.facts:
                self.facts.add(key)
                self.by_name[p[1]].append(p[2])

    @classmethod
    def from_state(cls, state: EnvState) -> FactBase:
        return cls(state_predicates(state))

    def __len__(self) -> int:
        return len(self.facts)


def _unify(args: tuple[str, ...], fact: tuple[str, ...], binding: dict[str, str]) -> dict[str, str] | None:
    if len(args) != len(fact):
        return None
    out = binding
    for a, v in zip(args, fact):
        m = SLOT.fullmatch(a)
        if m is None:
            if a != v:
                return None
            continue
        slot = m.group(1)
        bound = out.get(slot)
        if bound is not None:
            if bound != v:
                return None
            continue
        # Two slots never name the same entity: a template with {obj1} and {obj2} means two things.
        if v in out.values():
            return None
        if out is binding:
            out = dict(binding)
        out[slot] = v
    return out


def match_conditions(
    conditions: Sequence[str],
    facts: FactBase,
    binding: dict[str, str] | None = None,
    budget: int = 2000,
) -> tuple[int, int, dict[str, str]]:
    """Best existential match of templated predicates against ``facts``.

    Returns ``(satisfied, total, binding)``: the largest number of conditions that hold together
    under one extension of ``binding`` (a bounded depth-first search; ``budget`` caps the nodes
    explored, after which the first option is taken greedily). Negated conditions hold when no
    fact unifies with them. Conditions that do not parse count as unsatisfied.
    """
    binding = dict(binding or {})
    parsed = [parse_predicate(c) for c in conditions]
    total = len(parsed)
    # Most-constrained first: conditions whose slots are already bound prune the search most.

    def free(p: Pred) -> int:
        return sum(1 for a in p[2] if (m := SLOT.fullmatch(a)) is not None and m.group(1) not in binding)

    order = sorted((p for p in parsed if p is not None), key=lambda p: (p[0], free(p)))
    nodes = [0]

    def search(i: int, b: dict[str, str]) -> tuple[int, dict[str, str]]:
        if i == len(order):
            return 0, b
        nodes[0] += 1
        neg, name, args = order[i]
        if neg:
            hit = any(_unify(args, f, b) is not None for f in facts.by_name.get(name, ()))
            c, bb = search(i + 1, b)
            return c + (0 if hit else 1), bb
        options = [u for f in facts.by_name.get(name, ()) if (u := _unify(args, f, b)) is not None]
        if nodes[0] > budget:
            options = options[:1]
        best_c, best_b = -1, b
        for u in options:
            c, bb = search(i + 1, u)
            if c + 1 > best_c:
                best_c, best_b = c + 1, bb
            if best_c == len(order) - i:
                return best_c, best_b  # cannot do better
        if not options or nodes[0] <= budget:
            c, bb = search(i + 1, b)
            if c > best_c:
                best_c, best_b = c, bb
        return best_c, best_b

    sat, out = search(0, binding)
    return max(sat, 0), total, out


def template_slots(template: str) -> list[str]:
    """Slot names of a template, first-occurrence order."""
    return list(dict.fromkeys(SLOT.findall(template)))


def _literal(text: str) -> str:
    # Spaces in a template match any run of whitespace in the action.
    return r"\s+".join(re.escape(w) for w in text.split(" "))


def template_regex(template: str, slot_values: dict[str, list[str]] | None = None) -> re.Pattern[str]:
    """A full-match, case-insensitive regex for a templated action; slots become named groups.

    A repeated slot must repeat its value. Entity slots take any text; lexical slots (``{w1}``,
    words that varied between instances, like a direction) take any single word: the instances
    showed that this position varies, the recorded values only say which values were seen.
    """
    t = norm(template)
    parts: list[str] = []
    seen: set[str] = set()
    pos = 0
    for m in SLOT.finditer(t):
        parts.append(_literal(t[pos : m.start()]))
        slot = m.group(1)
        if slot in seen:
            parts.append(f"(?P={slot})")
        elif slot.startswith(LEXICAL_PREFIX):
            parts.append(f"(?P<{slot}>[^\\s]+)")
        else:
            parts.append(f"(?P<{slot}>.+?)")
        seen.add(slot)
        pos = m.end()
    parts.append(_literal(t[pos:]))
    return re.compile("".join(parts), re.IGNORECASE)


def fill_template(template: str, binding: dict[str, str]) -> str | None:
    """The template with its slots bound, or None when a slot has no value."""
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        v = binding.get(m.group(1))
        if v is None:
            missing = True
            return m.group(0)
        return v

    text = SLOT.sub(sub, template)
    return None if missing else text


def bind_predicates(preds: Sequence[str], binding: dict[str, str]) -> list[str]:
    """Predicates with the bound slots substituted (unbound slots stay as ``{slot}``)."""
    return [SLOT.sub(lambda m: binding.get(m.group(1), m.group(0)), p) for p in preds]
