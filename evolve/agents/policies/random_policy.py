"""Uniformly random admissible actions: the floor every learned policy must beat."""

from __future__ import annotations

import random
import re

from evolve.agents.base import Decision
from evolve.llm.prompts import allowed_actions, fallback_command
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Privileged, Step, Task

# Actions that only re-describe the world; skipped when ``avoid_noops`` is set.
NOOP_PATTERN = re.compile(
    r"^(look|l|look around|inventory|i|inv|help|wait\d*|score|examine .*|look at .*)$", re.I
)


class RandomPolicy:
    """Picks a uniformly random admissible action, reproducibly per (seed, task id)."""

    needs_privileged = False

    def __init__(self, seed: int = 0, *, avoid_noops: bool = False, name: str = "random") -> None:
        self.seed = seed
        self.avoid_noops = avoid_noops
        self.name = name
        self._rng = random.Random(seed)

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        # A string seed is hashed with SHA-512 by ``random``: stable across processes and runs,
        # unlike ``hash()``, so worker processes reproduce the same episode.
        self._rng = random.Random(f"{self.seed}:{task.id}")

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        # Refused actions (MemoryContext.blocked) are not drawn again on a re-ask.
        options = list(dict.fromkeys(allowed_actions(obs.admissible_actions, memory) or []))
        if not options:
            action = Action(text=fallback_command(None), source=ActionSource.fallback)
            return Decision(action=action, error="no admissible actions to choose from")
        if self.avoid_noops:
            active = [a for a in options if not NOOP_PATTERN.match(a.strip())]
            options = active or options
        return Decision(action=Action(text=self._rng.choice(options), source=ActionSource.policy))
