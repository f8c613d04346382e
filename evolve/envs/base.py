"""The environment protocol: every benchmark adapter implements these few methods."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from evolve.schema import Observation, Privileged, Split, Task


@runtime_checkable
class Env(Protocol):
    """A benchmark adapter. One instance owns one engine (one JVM, one game process).

    ``EnvState.facts`` are the state as predicates. An env that knows what its objects are adds
    class facts, ``is_<category>(x)`` and ``type_<class>(x)`` (ScienceWorld: ``is_living_thing(dove)``,
    ``type_dove(dove)``): memory binds skills and generalises fatal-action guardrails over them
    (``evolve.skills.predicates.KIND_PREFIXES``), so knowledge carries across variations whose
    objects have other names.
    """

    name: str

    def tasks(self, split: Split | str) -> list[Task]:
        """Tasks of a split, in a stable order."""
        ...

    def reset(self, task: Task | str) -> Observation:
        """Start an episode; ``task`` may be a ``Task`` or a task id."""
        ...

    def step(self, action: str) -> Observation:
        """Apply one text action. ``Observation.reward`` is the step reward; ``state.done`` ends it."""
        ...

    def privileged(self) -> Privileged:
        """Gold actions / walkthrough for the current episode (oracle teachers only)."""
        ...

    def close(self) -> None: ...
