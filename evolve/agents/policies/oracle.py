"""The environment oracle: replays the gold actions of the episode (a privileged teacher)."""

from __future__ import annotations

from evolve.agents.base import Decision
from evolve.llm.prompts import fallback_command
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Privileged, Step, Task
from evolve.text import normalise_command as normalise


class OraclePolicy:
    """Follows ``privileged.gold_actions`` in order.

    When the env diverges (the next gold action is not admissible while an admissible list
    exists), later gold actions that are admissible are tried in order; when none is, the first
    admissible action is taken. Gold actions carry ``source=oracle``; the divergence fallback
    carries ``source=fallback`` so that training data built from oracle steps never learns from
    it. Matching ignores case and spacing, and the env's own spelling is returned.
    """

    needs_privileged = True

    def __init__(self, name: str = "oracle") -> None:
        self.name = name
        self._gold: list[str] = []
        self._next = 0

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self._gold = list(privileged.gold_actions) if privileged is not None else []
        self._next = 0

    @property
    def remaining(self) -> list[str]:
        """Gold actions not yet taken."""
        return self._gold[self._next :]

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        admissible = obs.admissible_actions
        if not admissible:
            # No list to check against: trust the gold path.
            if self._next < len(self._gold):
                gold = self._gold[self._next]
                self._next += 1
                return Decision(action=Action(text=gold, source=ActionSource.oracle))
            return Decision(action=self._fallback(admissible, "gold path exhausted"))
        if self._next >= len(self._gold):
            return Decision(action=self._fallback(admissible, "gold path exhausted"))
        by_norm: dict[str, str] = {}
        for a in admissible:
            by_norm.setdefault(normalise(a), a)
        gold = self._gold[self._next]
        self._next += 1
        hit = by_norm.get(normalise(gold))
        if hit is not None:
            return Decision(action=Action(text=hit, source=ActionSource.oracle))
        # Admissible lists are not exhaustive (ScienceWorld accepts wordings it does not list,
        # e.g. "move egg dove egg in inventory to red box"): the engine is the judge, so send the
        # gold action verbatim rather than skipping a step the solution needs.
        return Decision(
            action=Action(
                text=gold, thought="gold action not in the admissible list", source=ActionSource.oracle
            )
        )

    @staticmethod
    def _fallback(admissible: list[str] | None, why: str) -> Action:
        text = admissible[0] if admissible else fallback_command(admissible)
        return Action(text=text, thought=f"oracle fallback: {why}", source=ActionSource.fallback)
