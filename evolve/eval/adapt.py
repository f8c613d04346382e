"""ADAPT, CLIN's protocol (Majumder et al., 2023): the same task over K trials, memory carried.

Trial ``k`` of a task runs with knowledge distilled from that task's trials ``1..k-1`` only (plus
``base_knowledge``: empty for CLIN's ADAPT, or the probated train knowledge), each item carrying
the uses, successes and failures it had in those trials (so an item that was used in failed
trials ranks lower next time, even when the distilled set is the same). Each trial is its own arm
label, so a rerun resumes where it stopped.

A flat curve must mean "no learning", not "the same episode again": with a greedy policy and a
fixed seed, a trial whose memory did not change replays the previous trial token for token (the
1.5B ScienceWorld run: trials 2-5 identical). ``temperature`` makes an LLM policy sample, and
``vary_seed`` gives trial ``k`` the policy seed ``seed + k - 1`` (a sampling server with a fixed
seed repeats itself too); the episode seed, i.e. the task instance, stays ``seed`` every trial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evolve.errors import ConfigError
from evolve.eval.harness import Episodes, Memory
from evolve.eval.metrics import arm_metrics, task_score
from evolve.eval.report import AdaptPoint
from evolve.schema import Knowledge, Task, Trajectory
from evolve.specs import PolicySpec


def trial_policy(
    policy: PolicySpec | dict[str, Any],
    trial: int,
    *,
    seed: int = 0,
    temperature: float | None = None,
    vary_seed: bool = False,
) -> PolicySpec:
    """The policy spec of ADAPT trial ``trial`` (1-based): ``temperature`` when given, and the
    policy seed ``(its own seed, else seed) + trial - 1`` when ``vary_seed``."""
    spec = PolicySpec.parse(policy)
    update: dict[str, object] = {}
    if temperature is not None:
        update["temperature"] = temperature
    if vary_seed:
        update["seed"] = (spec.seed if spec.seed is not None else seed) + trial - 1
    return spec.model_copy(update=update) if update else spec


def with_usage(knowledge: Sequence[Knowledge], usage: Mapping[str, tuple[int, int, int]]) -> list[Knowledge]:
    """Copies of ``knowledge`` whose stats add the ``(uses, successes, failures)`` of ``usage``."""
    out: list[Knowledge] = []
    for k in knowledge:
        u = usage.get(k.id)
        if u is None:
            out.append(k)
            continue
        stats = k.stats.model_copy(
            update={
                "uses": k.stats.uses + u[0],
                "successes": k.stats.successes + u[1],
                "failures": k.stats.failures + u[2],
            }
        )
        out.append(k.model_copy(update={"stats": stats}))
    return out


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
    temperature: float | None = None,
    vary_seed: bool = False,
) -> list[AdaptPoint]:
    """Run ADAPT on ``tasks`` and return per-trial success and score (bootstrap CIs over tasks).

    ``temperature`` / ``vary_seed``: see the module docstring (None / False: the policy as given,
    the same every trial).
    """
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
            if history and memory.usage is not None:
                snap = with_usage(snap, memory.usage(history))
            policy = trial_policy(episodes.policy, k, seed=seed, temperature=temperature, vary_seed=vary_seed)
            trajs = episodes.run(
                label(k), [task], hooks=memory.evolve(snap), policy=policy, seeds=(seed,), trials=1
            )
            history += trajs
            per_trial[k] += trajs
            memories[k].append(len(snap))
            if log is not None:
                tid = task.id if isinstance(task, Task) else task
                won = any(t.success for t in trajs)
                log(f"adapt {tid} trial {k}: {'won' if won else 'lost'} with {len(snap)} memories")
    return adapt_points(per_trial, memories, n_boot)


def adapt_points(
    per_trial: Mapping[int, Sequence[Trajectory]],
    memories: Mapping[int, Sequence[int]] | None = None,
    n_boot: int = 2000,
) -> list[AdaptPoint]:
    """One :class:`AdaptPoint` per trial from its episodes (one per task), in trial order;
    ``memories``: the knowledge items each task's trial ran with (else 0). Also what
    ``bench/keep.py table`` rebuilds a stopped run's curve with: the episodes are taken in
    (task, seed) order, so the bootstrap CIs do not depend on the order they came in."""
    points = []
    for k in sorted(per_trial):
        trajs = sorted(per_trial[k], key=lambda t: (t.task_id, t.seed or 0))
        m = arm_metrics(f"trial {k}", trajs, n_boot)
        mem = (memories or {}).get(k) or [0]
        points.append(
            AdaptPoint(
                trial=k,
                episodes=m.episodes,
                success=m.success,
                score=m.score,
                steps=m.steps_mean,
                memories=sum(mem) / len(mem),
                task_scores={t.task_id: task_score(t) for t in trajs},
            )
        )
    return points
