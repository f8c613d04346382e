"""The guardrail enforcer: the one place that decides whether a guardrail refuses an action.

A guardrail refuses ``action`` in a state, for a task goal, when

1. its ``forbidden_action`` regex full-matches the normalised action (case-insensitive; the named
   groups bind the guardrail's slots),
2. its scope matches the task (scope ``task`` with a ``task_pattern``: the pattern is found in the
   goal; any other guardrail applies to every task), and
3. its whole trigger holds in the state under that binding (unbound slots existentially); a
   condition ``[not] asked_by_goal(...)`` is no state fact but the question whether the goal asks
   for this action (:func:`evolve.skills.grounding.goal_asks`).

Patterns are compiled once per enforcer, so checking many actions against many guardrails (the
agent's check before every action, distillation's harm check over all recorded steps) costs one
compile per guardrail. A corrupt pattern never refuses anything and never crashes an agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from evolve.schema import EnvState, Guardrail, GuardrailScope, GuardrailVerdict
from evolve.skills.grounding import ASKED_BY_GOAL, goal_asks
from evolve.skills.predicates import FactBase, bind_predicates, match_conditions, parse_predicate
from evolve.text import normalise as norm


def trigger_holds(
    trigger: list[str], action: str, goal: str, facts: FactBase, binding: dict[str, str] | None = None
) -> tuple[bool, dict[str, str]]:
    """Does ``trigger`` hold for ``action`` under ``binding`` (and with which full binding)?

    State conditions are matched against ``facts``; ``[not] asked_by_goal(...)`` asks the goal.
    Without an ``action`` (is the rule live at all here?) goal conditions are left out."""
    state: list[str] = []
    for c in trigger:
        p = parse_predicate(c)
        if p is not None and p[1] == ASKED_BY_GOAL:
            if action and goal_asks(action, goal, facts) == p[0]:
                return False, dict(binding or {})
        else:
            state.append(c)
    sat, tot, full = match_conditions(state, facts, binding)
    return sat == tot, full


@dataclass(frozen=True)
class CompiledGuardrail:
    """A guardrail with its patterns compiled."""

    guardrail: Guardrail
    action: re.Pattern[str]
    """``forbidden_action``, compiled case-insensitive (full-matched against normalised actions)."""
    task: re.Pattern[str] | None = None
    """The task pattern when the guardrail is task-scoped with one; None: every task is in scope."""
    task_valid: bool = True
    """False when the task pattern does not compile: then no task is in scope."""

    @classmethod
    def of(cls, guardrail: Guardrail) -> CompiledGuardrail | None:
        """The compiled guardrail, or None when its ``forbidden_action`` is no valid regex."""
        try:
            action = re.compile(guardrail.forbidden_action, re.IGNORECASE)
        except re.error:
            return None
        if guardrail.scope != GuardrailScope.task or not guardrail.task_pattern:
            return cls(guardrail, action)
        try:
            return cls(guardrail, action, re.compile(guardrail.task_pattern, re.IGNORECASE))
        except re.error:
            return cls(guardrail, action, task_valid=False)

    def in_scope(self, goal: str) -> bool:
        """Does the guardrail apply to the task with this goal?"""
        return self.task_valid and (self.task is None or self.task.search(goal) is not None)

    def binding(self, normalised_action: str) -> dict[str, str] | None:
        """The slots bound when the regex full-matches ``normalised_action`` (see :func:`norm`), else None."""
        m = self.action.fullmatch(normalised_action)
        if m is None:
            return None
        return {k: norm(v) for k, v in m.groupdict().items() if v is not None}


class GuardrailEnforcer:
    """Enforces a set of guardrails (see the module docstring); the first one that refuses wins.

    Which guardrails take part (active only, or candidates too) is the caller's choice: every
    guardrail given is enforced, except those whose pattern does not compile.
    """

    def __init__(self, guardrails: Iterable[Guardrail]) -> None:
        self.rules: list[CompiledGuardrail] = [
            c for g in guardrails if (c := CompiledGuardrail.of(g)) is not None
        ]

    @property
    def guardrails(self) -> list[Guardrail]:
        return [r.guardrail for r in self.rules]

    def __len__(self) -> int:
        return len(self.rules)

    def refusal(
        self, action: str, state: EnvState, goal: str = ""
    ) -> tuple[Guardrail, dict[str, str]] | None:
        """The first guardrail refusing ``action`` in ``state`` for ``goal``, with its binding; else None."""
        a = norm(action)
        facts: FactBase | None = None
        for r in self.rules:
            b = r.binding(a)
            if b is None or not r.in_scope(goal):
                continue
            if facts is None:
                facts = FactBase.from_state(state)
            if trigger_holds(r.guardrail.trigger, action, goal, facts, b)[0]:
                return r.guardrail, b
        return None

    def refuses(self, action: str, state: EnvState, goal: str = "") -> bool:
        """True when some guardrail refuses ``action`` in ``state`` for ``goal``."""
        return self.refusal(action, state, goal) is not None

    def check(self, action: str, state: EnvState, goal: str = "") -> GuardrailVerdict:
        """The verdict on ``action``: allowed, or refused by the first guardrail that refuses it (and why)."""
        hit = self.refusal(action, state, goal)
        if hit is None:
            return GuardrailVerdict()
        g, b = hit
        when = "; ".join(bind_predicates(g.trigger, b)) or "always"
        return GuardrailVerdict(
            allowed=False,
            guardrail_id=g.id,
            reason=f"{g.root_cause.value} guardrail: '{action}' is refused when {when}"
            + (f" ({g.description})" if g.description else ""),
        )
