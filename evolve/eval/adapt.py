"""ADAPT, CLIN's protocol (Majumder et al., 2023): the same task over K trials, memory carried.

Trial ``k`` of a task runs with knowledge distilled from that task's trials ``1..k-1`` only (plus
``base_knowledge``: empty for CLIN's ADAPT, or the probated train knowledge), with the same seed
every trial, so what changes between trials is the memory alone. Each trial is its own arm label,
so a rerun resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evolve.errors import ConfigError
from evolve.eval.harness import Episodes, Memory
from evolve.eval.metrics import arm_metrics
from evolve.eval.report import AdaptPoint
from evolve.schema import Knowledge, Task, Trajectory


def adapt(
    episodes: Episodes,
    memory: Memory,
    tasks: Sequence[Task | str],
    *,
    trials: int = 5,
    seed: int = 0,
    base_knowledge: Sequence[Knowledge] = (),
    label: Callable[[int], str] = lambda k: f"adapt:{k}",
    n_boot: int = 2000,
    log: Callable[[str], None] | None = None,
) -> list[AdaptPoint]:
    """Run ADAPT on ``tasks`` and return per-trial success and score (bootstrap CIs over tasks)."""
    if memory.distill is None:
        raise ConfigError("ADAPT needs Memory.distill (knowledge from a task's earlier trials)")
    if trials < 1:
        raise ConfigError(f"ADAPT needs at least one trial, got {trials}")
    per_trial: dict[int, list[Trajectory]] = {k: [] for k in range(1, trials + 1)}
    memories: dict[int, list[int]] = {k: [] for k in per_trial}
    for task in tasks:
        history: list[Trajectory] = []
        for k in per_trial:
            snap = [*base_knowledge, *(memory.distill(history) if history else [])]
            trajs = episodes.run(label(k), [task], hooks=memory.evolve(snap), seeds=(seed,), trials=1)
            history += trajs
            per_trial[k] += trajs
            memories[k].append(len(snap))
            if log is not None:
                tid = task.id if isinstance(task, Task) else task
                won = any(t.success for t in trajs)
                log(f"adapt {tid} trial {k}: {'won' if won else 'lost'} with {len(snap)} memories")
    points = []
    for k, trajs in per_trial.items():
        m = arm_metrics(f"trial {k}", trajs, n_boot)
        points.append(
            AdaptPoint(
                trial=k,
                episodes=m.episodes,
                success=m.success,
                score=m.score,
                steps=m.steps_mean,
                memories=sum(memories[k]) / max(len(memories[k]), 1),
            )
        )
    return points
