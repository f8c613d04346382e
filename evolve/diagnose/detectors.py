"""Sliding-window detectors: stagnation (no progress) and loops (repeated action/state cycles).

Both are stateful per episode: call ``reset()`` at episode start and ``update(...)`` once per step.
``update`` returns True on the steps where the detector *fires*; ``evidence`` then says why.
"""

from __future__ import annotations

from collections import deque

from evolve.text import normalise


class StagnationDetector:
    """Fires when ``window`` consecutive steps made no progress, and again every ``window`` steps after.

    Firing once per window (not on every step) keeps stagnation an *event*: an agent that replans on
    it gets ``window`` steps to try the new plan before it is told to replan again. ``active`` is the
    continuous condition (at least ``window`` steps without progress).
    """

    def __init__(self, window: int = 10) -> None:
        if window < 1:
            raise ValueError(f"StagnationDetector window must be >= 1, got {window}")
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.steps_since_progress = 0
        self.evidence = ""

    @property
    def active(self) -> bool:
        return self.steps_since_progress >= self.window

    def update(self, progressed: bool) -> bool:
        """Record one step; True when this step completes a window without progress."""
        if progressed:
            self.steps_since_progress = 0
            self.evidence = ""
            return False
        self.steps_since_progress += 1
        if self.steps_since_progress % self.window == 0:
            self.evidence = f"no progress for {self.steps_since_progress} steps (window {self.window})"
            return True
        return False


class LoopDetector:
    """Fires when the agent repeats itself: the same action taken again in the same state.

    Keys are ``(action, state_key)`` where ``state_key`` hashes the state the action was taken in
    (see :func:`evolve.diagnose.diff.state_key`). Two patterns are reported:

    * a cycle of period ``p`` (``1 <= p <= window // min_repeats``) that occupies the last
      ``p * min_repeats`` steps, e.g. go north, go south, go north, go south;
    * the current key already seen ``min_repeats - 1`` times within the last ``window`` steps
      (the same state revisited with the same action, with other steps in between).

    The first subsumes the second, but naming the cycle makes the evidence actionable.
    """

    def __init__(self, window: int = 8, min_repeats: int = 2) -> None:
        if min_repeats < 2:
            raise ValueError(f"LoopDetector min_repeats must be >= 2, got {min_repeats}")
        if window < min_repeats:
            raise ValueError(f"LoopDetector window ({window}) must be >= min_repeats ({min_repeats})")
        self.window = window
        self.min_repeats = min_repeats
        self.reset()

    def reset(self) -> None:
        self._keys: deque[tuple[str, str]] = deque(maxlen=self.window)
        self._actions: deque[str] = deque(maxlen=self.window)
        self.evidence = ""
        self.period: int | None = None

    def update(self, action: str, state_key: str) -> bool:
        """Record ``action`` taken in the state hashed as ``state_key``; True when it repeats."""
        self._keys.append((normalise(action), state_key))
        self._actions.append(action.strip())
        self.evidence = ""
        self.period = None
        keys = list(self._keys)
        n = len(keys)
        for p in range(1, self.window // self.min_repeats + 1):
            span = p * self.min_repeats
            if span > n:
                break
            tail = keys[n - span :]
            block = tail[:p]
            if all(tail[i] == block[i % p] for i in range(span)):
                cycle = " -> ".join(list(self._actions)[n - p :])
                self.period = p
                self.evidence = f"cycle of period {p} repeated {self.min_repeats}x: {cycle}"
                return True
        count = keys.count(keys[-1])
        if count >= self.min_repeats:
            self.evidence = (
                f"'{self._actions[-1]}' taken {count}x in the same state within the last {n} steps"
            )
            return True
        return False
