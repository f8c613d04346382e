"""Collection throughput and policy success: episodes/s and steps/s with 1 and 2 workers.

For TextWorld and ScienceWorld, the oracle and the random policy run over the train split with
1 and 2 workers (throughput), and over the dev and test splits with the larger worker count
(success per split). Wall time includes starting the workers (interpreters, JVMs), which is what
a user waits for; "steps/s per worker" excludes it.

    python bench/collect.py                          # defaults: ~5-10 min on 2 busy cores
    python bench/collect.py --envs textworld --tw-episodes 20 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from rich.console import Console  # noqa: E402

from evolve.agents.collect import collect  # noqa: E402
from evolve.schema import Outcome  # noqa: E402


def run(env: dict[str, Any], policy: str, split: str, workers: int, n: int, max_steps: int) -> list[Any]:
    t = time.perf_counter()
    trajs = collect(
        env,
        {"kind": policy},
        split=split,
        n_episodes=n,
        workers=workers,
        max_steps=max_steps,
        seed=0,
        progress=False,
    )
    wall = time.perf_counter() - t
    steps = sum(len(x.steps) for x in trajs)
    busy = sum(x.metadata.get("wall_s", 0.0) for x in trajs) / workers
    ok = sum(x.outcome == Outcome.success for x in trajs)
    errors = sum(x.outcome == Outcome.error for x in trajs)
    score = sum(x.normalized_score for x in trajs) / max(len(trajs), 1)
    return [
        env["name"],
        policy,
        split,
        workers,
        len(trajs),
        steps,
        round(wall, 1),
        len(trajs) / wall,
        steps / wall,
        steps / busy / workers if busy else None,
        100.0 * ok / max(len(trajs), 1),
        score,
        errors,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", nargs="+", default=["textworld", "scienceworld"])
    ap.add_argument("--policies", nargs="+", default=["oracle", "random"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    ap.add_argument("--tw-episodes", type=int, default=10, help="TextWorld episodes per run")
    ap.add_argument("--sw-episodes", type=int, default=6, help="ScienceWorld episodes per run")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument(
        "--sw-tasks",
        nargs="*",
        default=["find-living-thing", "find-non-living-thing", "use-thermometer", "power-component"],
        help="ScienceWorld task names (fewer = faster variation listing at start)",
    )
    args = ap.parse_args()

    envs = []
    for name in args.envs:
        if name == "textworld":
            envs.append(({"name": "textworld", "n_train": 12, "n_dev": 6, "n_test": 6}, args.tw_episodes))
        elif name == "scienceworld":
            if shutil.which("java") is None:
                print("skipping scienceworld: java is not installed")
                continue
            kw = {"task_names": args.sw_tasks, "max_variations": 5} if args.sw_tasks else {}
            envs.append(({"name": "scienceworld", **kw}, args.sw_episodes))
        else:
            envs.append(({"name": name}, args.tw_episodes))

    for env, _ in envs:
        if env["name"] == "textworld":
            # Generate and cache the games first: compiling a game (seconds) is a one-time cost,
            # not collection throughput.
            from evolve.envs import make_env

            tw = make_env("textworld", **{k: v for k, v in env.items() if k != "name"})
            for split in args.splits:
                for task in tw.tasks(split):
                    tw.game_file(task)

    rows = []
    top = max(args.workers)
    t0 = time.perf_counter()
    for env, n in envs:
        for policy in args.policies:
            for split in args.splits:
                for w in args.workers if split == "train" else [top]:
                    row = run(env, policy, split, w, n, args.max_steps)
                    print(
                        f"  {row[0]} {policy} {split} workers={w}: {row[4]} episodes in {row[6]} s",
                        flush=True,
                    )
                    rows.append(row)
    columns = [
        "env",
        "policy",
        "split",
        "workers",
        "episodes",
        "steps",
        "wall s",
        "episodes/s",
        "steps/s",
        "steps/s per worker",
        "success %",
        "mean score",
        "errors",
    ]
    caption = f"max_steps={args.max_steps}, seed 0; total {time.perf_counter() - t0:.0f} s"
    # Wide enough for every column even when stdout is not a terminal (80 columns by default).
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    md = print_table(
        "evolve collect: throughput and success", columns, rows, console=console, caption=caption
    )
    print()
    print(md)


if __name__ == "__main__":
    main()
