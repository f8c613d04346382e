"""Goal grounding: does a sentence of the task's goal ask for an action?

An action is split into its verb and noun phrases (``"take red key from box"`` -> ``tak``,
``[["red", "key"], ["box"]]``); a sentence grounds it by the share of each phrase's words it has
(the direct object counts double) times how well its verb matches. For :func:`goal_asks`, a
sentence that names a more specific thing than the action ("the violet paint" vs ``paint in cup
containing yellow paint``) grounds nothing. An object can also be named by its class ("find a(n)
living thing. First, focus on the thing." asks for ``focus on blue jay``) or by a class it is
*not* of ("a(n) non-living thing"): :func:`class_readings`. :func:`goal_asks` is the yes/no question guardrails ask
(``not asked_by_goal({obj1})``: a fatal action on an object the goal does not ask for).

The retrieval's :class:`~evolve.skills.retrieval.GoalTracker` scores relevance with the same
functions; the enforcer asks :func:`goal_asks`; neither keeps its own copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from evolve.skills.predicates import FactBase, goal_kinds, kind_phrase
from evolve.text import GROUNDING_STOPWORDS as STOP
from evolve.text import content_stems, stem, words
from evolve.text import normalise as norm

ASKED_BY_GOAL = "asked_by_goal"
"""The predicate of :func:`goal_asks` in a guardrail's trigger (``not asked_by_goal({obj1})``):
not a state fact but a question about the action and the goal, answered by the enforcer."""


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;])\s+|\n+", text.strip())
    return [p.strip() for p in parts if p.strip()]


# Words that separate an action's noun phrases ("take X from Y", "unlock X with Y").
PREPOSITIONS = frozenset(
    [
        "with",
        "from",
        "into",
        "in",
        "on",
        "onto",
        "inside",
        "to",
        "at",
        "under",
        "over",
        "through",
        "using",
        "for",
    ]
)


def action_parts(action: str) -> tuple[str, list[str]]:
    """``"unlock safe with key"`` -> ``("unlock", ["safe", "key"])`` (stems, function words dropped)."""
    ws = words(action)
    if not ws:
        return "", []
    return stem(ws[0]), [stem(w) for w in ws[1:] if w not in STOP]


def action_phrases(action: str) -> tuple[str, list[list[str]]]:
    """``"take type 5 key from safe"`` -> ``("tak", [["type", "5", "key"], ["saf"]])``: verb + noun phrases."""
    ws = words(action)
    if not ws:
        return "", []
    phrases: list[list[str]] = [[]]
    for w in ws[1:]:
        if w in PREPOSITIONS:
            phrases.append([])
        elif w not in STOP:
            phrases[-1].append(w)
    return stem(ws[0]), [p for p in phrases if p]


# Words that open a noun phrase in a goal sentence; "a(n)" (ScienceWorld's goals) reads "a", "n".
_DETERMINERS = frozenset(["the", "a", "an", "n"])
# Words that open a clause or a next step after a name ("the thermometer, which is ..."): the name
# before them is a whole noun phrase, not a modifier of a following noun.
_CLAUSE = frozenset(
    [
        "which",
        "who",
        "where",
        "when",
        "while",
        "so",
        "but",
        "if",
        "first",
        "next",
        "after",
        "before",
        "located",
    ]
)


def _more_specific(stems_: list[str], sentence_words: str) -> bool:
    """Does every mention of the phrase's head noun in the sentence carry a word the phrase lacks,
    between a determiner and the head ("focus on the violet paint" vs ``paint``, "the yellow box" vs
    ``green box``), or modify a noun after it ("the orange paint" vs ``orange``, the fruit)? A
    mention without a determiner right before its words ("create violet paint") says nothing about
    modifiers and counts as a match."""
    ws = sentence_words.split()
    have = set(stems_)
    mentions = [j for j, w in enumerate(ws) if stem(w) == stems_[-1]]
    for j in mentions:
        after = ws[j + 1] if j + 1 < len(ws) else ""
        if after and not ({after} & (STOP | PREPOSITIONS | _DETERMINERS | _CLAUSE)):
            continue  # "orange paint": the mention names the paint, not the orange
        mods: list[str] = []
        opened = False
        for w in reversed(ws[max(0, j - 5) : j]):
            if w in _DETERMINERS:
                opened = True
                break
            if w in STOP or w in PREPOSITIONS:
                break
            mods.append(w)
        if not opened or all(stem(m) in have for m in mods):
            return False
    return bool(mentions)


def _phrase_cover(
    phrase: list[str], sentence: set[str], sentence_words: str, others: Sequence[str], specific: bool = False
) -> float:
    """Share of the phrase's words the sentence has (0 without its head noun, or when the sentence
    names a more specific thing: a longer entity ending in this phrase, "type T passkey" is not
    "passkey", or the same head with other modifiers, "the violet paint" is not "paint in cup
    containing yellow paint")."""
    stems_ = [stem(w) for w in phrase]
    if stems_[-1] not in sentence:
        return 0.0
    name = " ".join(phrase)
    for e in others:
        if e != name and e.endswith(" " + name) and f" {e} " in sentence_words:
            return 0.0
    if specific and _more_specific(stems_, sentence_words):
        return 0.0
    return sum(1 for x in stems_ if x in sentence) / len(stems_)


def grounding(
    action: str,
    sentence_stems: set[str],
    cues: dict[str, float],
    *,
    sentence_text: str = "",
    entities: Sequence[str] = (),
    known_verbs: set[str] | None = None,
    require_verb: bool = False,
    specific: bool = False,
) -> float:
    """How well one goal sentence asks for ``action``: noun-phrase coverage x verb match.

    ``specific``: a sentence naming a more specific thing ("the violet paint" for ``paint in cup
    ...``) grounds nothing. :func:`goal_asks` (a guardrail refusing fatal actions) asks so; skill
    relevance does not: on TextWorld's quickstart it cost evolve 95% -> 80%, goals there name
    objects with words their commands leave out.

    The direct object counts double (goals often leave out the instrument: "unlock the door").
    The verb matches literally or through ``cues``, goal words learned for it (``retrieve`` for
    ``take``). When the sentence's verb is unknown (none of ``known_verbs`` in it), coverage alone
    earns more than when the sentence asks for another known verb (``drop`` for "retrieve the key").
    """
    verb, phrases = action_phrases(action)
    if not phrases:
        return 0.0
    padded = f" {' '.join(words(sentence_text))} "
    covers = [_phrase_cover(p, sentence_stems, padded, entities, specific) for p in phrases]
    if covers[0] == 0:
        return 0.0
    cov = (2 * covers[0] + sum(covers[1:])) / (len(covers) + 1)
    verb_hit = 1.0 if verb in sentence_stems else max((cues.get(w, 0.0) for w in sentence_stems), default=0.0)
    if verb_hit == 0 and require_verb:
        return 0.0
    if verb_hit == 0 and known_verbs is not None and not (sentence_stems & known_verbs):
        return cov * 0.7
    return cov * (0.4 + 0.6 * verb_hit)


def instruction(goal: str) -> str:
    """The goal's instruction sentence (the one that says "task" or "goal", else the first): where
    a goal names the class it wants ("find a(n) plant"), not the rooms and boxes of later steps."""
    sents = split_sentences(goal)
    return next((s for s in sents if re.search(r"\btask\b|\bgoal\b", s, re.I)), sents[0] if sents else "")


def _objects(facts: FactBase) -> dict[str, list[str]]:
    """The objects of each class phrase in ``facts`` (``{"living thing": ["blue jay", ...]}``)."""
    by_phrase: dict[str, list[str]] = {}
    for name, rows in facts.by_name.items():
        phrase = kind_phrase(name)
        if phrase is not None:
            by_phrase.setdefault(phrase, []).extend(r[0] for r in rows if len(r) == 1)
    return by_phrase


def _names(name: str) -> re.Pattern[str]:
    """``name`` as a whole name inside an action ("apple tree" in "focus on apple tree", not in
    "focus on apple trees" or "focus on non-apple tree")."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


def _unwanted(goal: str, phrases: Sequence[str]) -> set[str]:
    """Class phrases the goal names as unwanted ("a(n) non-living thing" -> ``living thing``), also
    when nothing of that class is in view."""
    _, unwanted = goal_kinds(goal, phrases)
    for m in re.finditer(r"(?<![\w-])non-([a-z]+(?: [a-z]+)?)", goal.lower()):
        unwanted.add(m.group(1))
    return unwanted


def class_readings(action: str, goal: str, facts: FactBase | None = None) -> list[str]:
    """``action`` and, when it acts on an object of a class the goal names, the same action with
    the object named by its class: "focus on baby wolf" also reads "focus on living thing", which
    is how "find a(n) living thing. First, focus on the thing." asks for it. An object *not* of a
    class the goal names as unwanted reads as the goal's phrase: under "find a(n) non-living
    thing", "focus on glass jar" also reads "focus on non-living thing" and "focus on thing"."""
    if facts is None:
        return [action]
    by_phrase = _objects(facts)
    if not by_phrase:
        return [action]
    task = instruction(goal)
    wanted, _ = goal_kinds(task, by_phrase)
    named: dict[str, str] = {}  # object name -> the goal's phrase for it
    for ph in sorted(wanted, key=len):  # the longest phrase an object has wins
        for o in by_phrase[ph]:
            named[o] = ph
    every = {o for objs in by_phrase.values() for o in objs}
    for u in sorted(_unwanted(task, list(by_phrase))):
        for o in every - set(by_phrase.get(u, [])):
            named.setdefault(o, "non-" + u)
    a = norm(action)
    alias, head, thing = a, a, a
    for o in sorted(named, key=len, reverse=True):
        rx = _names(o)
        if rx.search(alias):
            alias = rx.sub(named[o], alias)
            # A goal names the class once and then refers back to it by its head noun or as "the
            # thing" ("find a(n) living thing. First, focus on the thing."; "find a(n) plant. ...").
            head = rx.sub(named[o].split()[-1], head)
            thing = rx.sub("thing", thing)
    return [action] if alias == a else list(dict.fromkeys([action, alias, head, thing]))


def goal_asks(action: str, goal: str, facts: FactBase | None = None) -> bool:
    """Does a sentence of ``goal`` that says the action's verb ask for it, on this object (by its
    name with nothing more specific, or by a class it is or is not of)?

    "First, focus on the thermometer." asks for ``focus on thermometer`` and ``focus on
    thermometer in inventory``, not for ``focus on art studio door``; "First, focus on the
    thing." after "find a(n) living thing" asks for a focus on any living thing in ``facts``."""
    verb = action_parts(action)[0]
    asking = [(s, set(content_stems(s))) for s in split_sentences(goal)]
    asking = [(s, st) for s, st in asking if verb in st]
    if not asking:
        return False
    by_phrase = _objects(facts) if facts is not None else {}
    if unwanted := _unwanted(instruction(goal), list(by_phrase)):
        # "a(n) non-living thing": anything not known to be a living thing is what it asks for
        # (an object without class facts too: the engine does not say it is one).
        a = norm(action)
        members = {o for u in unwanted for o in by_phrase.get(u, [])}
        if not any(_names(o).search(a) for o in members):
            return True
    readings = class_readings(action, goal, facts)
    return any(
        grounding(r, st, {}, sentence_text=s, require_verb=True, specific=True) > 0
        for s, st in asking
        for r in readings
    )
