"""Does evolving knowledge help? Three arms on held-out tasks, same base policy, same seeds.

Arms (``--arms``):

* ``no_memory``      the base policy alone;
* ``raw_retrieval``  static retrieval of raw past successful trajectories (``RawTrajectoryMemory``);
* ``evolve``         skills + guardrails + replanning (``EvolveMemory``) after distillation on the
                     train experience and probation on dev tasks.

Knowledge is learned on TRAIN tasks only (``--knowledge``: the base policy's own experience,
oracle demos, or both), activated by probation on DEV tasks, and measured on TEST tasks. Every
finished episode is written at once to ``OUT/store.duckdb`` keyed by (arm, task, seed): a rerun
skips what is done (``--arms``, ``--tasks``, ``--trials`` pick subsets). It reports success rate,
score (0-100) and steps with bootstrap 95% CIs, paired deltas, the success curve as knowledge
accumulates, and failure causes per arm; PNGs, ``report.md`` and ``results.json`` go to OUT.

    python bench/evolution.py                                  # offline: random policy, TextWorld
    python bench/evolution.py --knowledge own --train-trials 3  # no teacher: self-evolution only
    python bench/evolution.py --policy openai --base-url http://127.0.0.1:8080/v1 --model qwen
    python bench/evolution.py --env scienceworld --sw-tasks find-living-thing use-thermometer

The default run takes ~8 min on 2 busy cores once the 68 TextWorld games are cached (generating
them costs ~5 s each, once, in ``~/.cache/evolve/textworld``). With an LLM policy, the arms'
episodes are what costs: use ``--tasks``/``--trials`` to size the run, rerun to resume, and
``--no-propose`` to let the memories only inject context (no macro/replay actions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from plots import bars_with_ci, curve, curves, grouped_counts  # noqa: E402
from rich.console import Console  # noqa: E402

from evolve.agents.collect import EnvSpec, collect, done_episodes  # noqa: E402
from evolve.agents.specs import PolicySpec  # noqa: E402
from evolve.eval.metrics import arm_metrics, bootstrap, compare  # noqa: E402
from evolve.schema import Guardrail, KnowledgeStatus, Skill, Task, Trajectory  # noqa: E402
from evolve.skills import (  # noqa: E402
    EvolveMemory,
    MemoryConfig,
    RawTrajectoryMemory,
    apply_usage,
    distill_knowledge,
    distill_snapshot,
    knowledge_of,
    run_probation,
    usage_from_trajectories,
)
from evolve.stores import ExperienceStore, make_embedder  # noqa: E402

ARMS = ("no_memory", "raw_retrieval", "evolve")
CONSOLE = Console(width=max(140, shutil.get_terminal_size((140, 40)).columns))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", choices=["textworld", "scienceworld"], default="textworld")
    ap.add_argument("--out", default="runs/evolution")
    ap.add_argument("--run-name", default=None, help="namespace in the store (default: from the config)")
    ap.add_argument("--n-train", type=int, default=30)
    ap.add_argument("--n-dev", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=30)
    ap.add_argument(
        "--tasks", default=None, help="test subset: a count N (first N) or comma-separated task ids"
    )
    ap.add_argument("--trials", type=int, default=2, help="seeds per test task")
    ap.add_argument("--train-trials", type=int, default=1, help="base-policy episodes per train task")
    ap.add_argument("--dev-trials", type=int, default=1)
    ap.add_argument("--oracle-demos", type=int, default=5, help="train tasks with one oracle demo each")
    ap.add_argument(
        "--knowledge",
        choices=["own", "oracle", "own+oracle"],
        default="own+oracle",
        help="experience to learn from: the base policy's own, oracle demos, or both",
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedder", default="hash", help="hash | default (MiniLM) | a local model path")
    ap.add_argument("--no-probation", action="store_true", help="activate every distilled candidate")
    ap.add_argument(
        "--no-propose",
        action="store_true",
        help="memories only inject into the prompt (and evolve enforces guardrails); no macro/replay actions",
    )
    ap.add_argument(
        "--curve", default="0,5,10,20,all", help="train-episode counts for the learning curve ('' = off)"
    )
    ap.add_argument("--curve-tasks", type=int, default=10, help="test tasks (1 seed) per curve point")
    ap.add_argument(
        "--adapt-tasks",
        type=int,
        default=0,
        help="ADAPT curve (CLIN's protocol): the first N test tasks, each over --adapt-trials trials with "
        "memory carried from trial to trial (0 = off)",
    )
    ap.add_argument("--adapt-trials", type=int, default=5)
    ap.add_argument(
        "--adapt-start",
        choices=["empty", "knowledge"],
        default="empty",
        help="memory at trial 1: nothing (CLIN's ADAPT) or the probated train knowledge",
    )
    ap.add_argument("--skip-arms", action="store_true", help="run only the ADAPT curve (no held-out arms)")
    ap.add_argument("--policy", choices=["random", "openai", "hf"], default="random")
    ap.add_argument("--model", default=None)
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY")
    ap.add_argument(
        "--max-actions", type=int, default=60, help="LLM policies: admissible actions shown per prompt"
    )
    ap.add_argument("--model-path", default=None, help="local HF model dir for --policy hf")
    ap.add_argument("--game-type", default="custom", help="TextWorld: custom | cooking | treasure_hunter")
    ap.add_argument("--sw-tasks", nargs="*", default=["find-living-thing", "find-plant", "use-thermometer"])
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- setup


def env_spec(args: argparse.Namespace) -> EnvSpec:
    if args.env == "textworld":
        kw = {
            "game_type": args.game_type,
            "n_train": args.n_train,
            "n_dev": args.n_dev,
            "n_test": args.n_test,
        }
    else:
        per = max(args.n_train, args.n_dev, args.n_test)
        kw = {"task_names": list(args.sw_tasks), "max_variations": max(1, -(-per // len(args.sw_tasks)))}
    return EnvSpec(name=args.env, kwargs=kw)


def policy_spec(args: argparse.Namespace) -> PolicySpec:
    if args.policy == "random":
        return PolicySpec(kind="random", seed=args.seed)
    if args.policy == "openai":
        return PolicySpec(
            kind="openai",
            model=args.model,
            base_url=args.base_url,
            api_key_env=args.api_key_env,
            seed=args.seed,
            max_actions=args.max_actions,
        )
    return PolicySpec(kind="hf", path=args.model_path, seed=args.seed)


def _round_robin(tasks: list[Task], n: int) -> list[Task]:
    """Up to ``n`` tasks, alternating between task families (ScienceWorld lists them grouped)."""
    fams: dict[str, list[Task]] = {}
    for t in tasks:
        fams.setdefault(t.id.rsplit("-v", 1)[0] if t.id.startswith("sw-") else "tw", []).append(t)
    out: list[Task] = []
    while len(out) < n and any(fams.values()):
        for f in list(fams):
            if fams[f] and len(out) < n:
                out.append(fams[f].pop(0))
    return out


def split_tasks(args: argparse.Namespace, spec: EnvSpec) -> dict[str, list[Task]]:
    env = spec.make()
    try:
        out = {
            "train": _round_robin(env.tasks("train"), args.n_train),
            "dev": _round_robin(env.tasks("dev"), args.n_dev),
            "test": _round_robin(env.tasks("test"), args.n_test),
        }
    finally:
        env.close()
    if args.tasks:
        if args.tasks.isdigit():
            out["test"] = out["test"][: int(args.tasks)]
        else:
            want = set(args.tasks.split(","))
            out["test"] = [t for t in out["test"] if t.id in want]
    return out


class Bench:
    """The state of one benchmark run: store, specs, task splits."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = env_spec(args)
        self.policy = policy_spec(args)
        pol_name = args.policy if args.policy == "random" else f"{args.policy}-{args.model or 'model'}"
        # Everything that changes what an episode does is in the namespace, so reruns never mix.
        default_ns = (
            f"{args.env}-{pol_name}-{args.knowledge}-s{args.max_steps}"
            + ("-noprop" if args.no_propose else "")
            + (f"-a{args.max_actions}" if args.max_actions != 60 else "")
        )
        self.ns = (args.run_name or default_ns).replace("/", "_")
        self.store = ExperienceStore(
            self.out / "store.duckdb", namespace=self.ns, embedder=make_embedder("hash")
        )
        self.tasks = split_tasks(args, self.env)
        self.log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
        self.memory_config = MemoryConfig(propose=not args.no_propose)

    def episodes(
        self,
        run_id: str,
        tasks: list[Task],
        trials: int,
        hooks_factory: Any = None,
        policy: PolicySpec | None = None,
    ) -> list[Trajectory]:
        """Run (task x trial) episodes under ``run_id``, skipping those already in the store."""
        a = self.args
        done = done_episodes(self.store, self.ns, run_id=run_id)
        want = {(t.id, a.seed + k) for t in tasks for k in range(trials)}
        if tasks and not want <= done:
            t0 = time.perf_counter()
            collect(
                self.env,
                policy or self.policy,
                tasks=tasks,
                n_episodes=len(tasks) * trials,
                workers=a.workers,
                store=self.store,
                namespace=self.ns,
                run_id=run_id,
                max_steps=a.max_steps,
                hooks_factory=hooks_factory,
                arm=run_id,
                seed=a.seed,
                progress=not a.quiet and sys.stderr.isatty(),
                skip_done=done,
                batch_size=1,
            )
            self.log(f"  {run_id}: {len(want - done)} episodes in {time.perf_counter() - t0:.0f}s")
        ids = {t.id for t in tasks}
        trajs = [t for t in self.store.trajectories(self.ns, run_id=run_id) if t.task_id in ids]
        return [t for t in trajs if t.seed is not None and t.seed - a.seed < trials]

    # ------------------------------------------------------------------ stages

    def experience(self) -> list[Trajectory]:
        """Train-task experience, per ``--knowledge``."""
        a = self.args
        trajs: list[Trajectory] = []
        if a.knowledge in ("own", "own+oracle"):
            trajs += self.episodes("train:own", self.tasks["train"], a.train_trials)
        if a.knowledge in ("oracle", "own+oracle") and a.oracle_demos > 0:
            demos = self.tasks["train"][: a.oracle_demos]
            trajs += self.episodes("train:oracle", demos, 1, policy=PolicySpec(kind="oracle"))
        # The experience stream, task by task (own episodes, then the demo when there is one): the
        # order in which the learning curve sees knowledge accumulate.
        order = {t.id: i for i, t in enumerate(self.tasks["train"])}
        trajs.sort(
            key=lambda t: (order.get(t.task_id, len(order)), t.run_id == "train:oracle", t.seed or 0, t.id)
        )
        return trajs

    def knowledge(self, train: list[Trajectory]) -> dict[str, Any]:
        """Distill + merge into the store, then probation on dev (each stage once per run)."""
        a = self.args
        stages = self.store.stages(self.ns)
        info: dict[str, Any] = {}
        if stages.get("distill", {}).get("status") != "done":
            skills, guards = distill_knowledge(train, store=self.store, namespace=self.ns)
            info["distilled"] = {"skills": len(skills), "guardrails": len(guards)}
            self.store.set_stage(self.ns, "distill", "done", info["distilled"])
        else:
            info["distilled"] = stages["distill"]["data"]
        if stages.get("probation", {}).get("status") != "done":
            cands = knowledge_of(self.store, self.ns, ("candidate",))
            if a.no_probation:
                for k in cands:
                    k.status = KnowledgeStatus.active
                self.store.upsert_skills([k for k in cands if isinstance(k, Skill)])
                self.store.upsert_guardrails([k for k in cands if isinstance(k, Guardrail)])
                summary: dict[str, Any] = {"skipped": True, "promoted": len(cands)}
            else:
                summary = run_probation(
                    self.store, cands, self._probation_runner, self.tasks["dev"], namespace=self.ns
                )
            self.store.set_stage(self.ns, "probation", "done", summary)
            info["probation"] = summary
        else:
            info["probation"] = stages["probation"]["data"]
        counts = {}
        for kind, fn in (("skills", self.store.skills), ("guardrails", self.store.guardrails)):
            counts[kind] = {s: len(fn(self.ns, status=s)) for s in ("candidate", "active", "retired")}
        info["counts"] = counts
        return info

    def _probation_runner(self, knowledge: list[Any], task_ids: list[str], arm: str) -> list[Trajectory]:
        tasks = [t for t in self.tasks["dev"] if t.id in set(task_ids)]
        factory = EvolveMemory.factory(
            knowledge, embedder=self.args.embedder, env=self.args.env, config=self.memory_config
        )
        # Each probation evaluation is its own run id: a rerun after a crash resumes it.
        digest = hashlib.sha1(",".join(sorted(k.id for k in knowledge)).encode()).hexdigest()[:10]
        tag = f"{len(knowledge)}-{digest}"
        return self.episodes(f"probation:{arm}:{tag}", tasks, self.args.dev_trials, factory)

    def arm(self, name: str, train: list[Trajectory]) -> list[Trajectory]:
        a = self.args
        factory: Any = None
        if name == "raw_retrieval":
            factory = RawTrajectoryMemory.factory(train, embedder=a.embedder, propose=not a.no_propose)
        elif name == "evolve":
            factory = EvolveMemory.factory(
                knowledge_of(self.store, self.ns), embedder=a.embedder, env=a.env, config=self.memory_config
            )
        elif name != "no_memory":
            raise SystemExit(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
        trajs = self.episodes(f"eval:{name}", self.tasks["test"], a.trials, factory)
        if name == "evolve":
            apply_usage(self.store, usage_from_trajectories(trajs), self.ns)
        return trajs

    def learning_curve(self, train: list[Trajectory]) -> list[dict[str, Any]]:
        """Success on test tasks (1 seed) with knowledge from the first N train episodes."""
        a = self.args
        if not a.curve:
            return []
        tasks = self.tasks["test"][: a.curve_tasks]
        points = []
        for tok in a.curve.split(","):
            n = len(train) if tok.strip() == "all" else min(int(tok), len(train))
            if any(p["train_episodes"] == n for p in points):
                continue
            snap = distill_snapshot(train[:n], self.store, self.ns) if n else []
            factory = EvolveMemory.factory(snap, embedder=a.embedder, env=a.env, config=self.memory_config)
            trajs = self.episodes(f"curve:{n}", tasks, 1, factory)
            est = bootstrap([100.0 if t.success else 0.0 for t in trajs])
            points.append(
                {
                    "train_episodes": n,
                    "train_successes": sum(t.success for t in train[:n]),
                    "skills": sum(isinstance(k, Skill) for k in snap),
                    "guardrails": sum(isinstance(k, Guardrail) for k in snap),
                    "success": est.mean,
                    "lo": est.lo,
                    "hi": est.hi,
                    "episodes": len(trajs),
                }
            )
            self.log(f"  curve: {n} train episodes -> {est.mean:.1f}% success ({len(trajs)} episodes)")
        return points

    def adapt(self) -> list[dict[str, Any]]:
        """CLIN's ADAPT protocol: each task over K trials, the memory distilled after every trial.

        Trial ``k`` of a task runs with knowledge distilled from that task's trials ``1..k-1`` (and,
        with ``--adapt-start knowledge``, the probated train knowledge too); same seed every trial,
        so what changes between trials is the memory alone. Returns per-trial success and score.
        """
        a = self.args
        if a.adapt_tasks <= 0:
            return []
        tasks = self.tasks["test"][: a.adapt_tasks]
        base = knowledge_of(self.store, self.ns) if a.adapt_start == "knowledge" else []
        per_trial: dict[int, list[Trajectory]] = {k: [] for k in range(1, a.adapt_trials + 1)}
        memories: dict[int, list[int]] = {k: [] for k in per_trial}
        for task in tasks:
            history: list[Trajectory] = []
            for k in range(1, a.adapt_trials + 1):
                snap = [*base, *distill_snapshot(history, self.store, self.ns)]
                factory = EvolveMemory.factory(
                    snap, embedder=a.embedder, env=a.env, config=self.memory_config
                )
                trajs = self.episodes(f"adapt:{a.adapt_start}:{k}", [task], 1, factory)
                history += trajs
                per_trial[k] += trajs
                memories[k].append(len(snap))
                won = sum(t.success for t in trajs)
                self.log(f"  adapt {task.id} trial {k}: {'won' if won else 'lost'} with {len(snap)} memories")
        points = []
        for k, trajs in per_trial.items():
            m = arm_metrics(f"trial {k}", trajs)  # success 0-1, score 0-100, both with bootstrap CIs
            points.append(
                {
                    "trial": k,
                    "episodes": m.episodes,
                    "success": m.success.mean * 100,
                    "success_lo": m.success.lo * 100,
                    "success_hi": m.success.hi * 100,
                    "score": m.score.mean,
                    "score_lo": m.score.lo,
                    "score_hi": m.score.hi,
                    "steps": m.steps_mean,
                    "memories": sum(memories[k]) / max(len(memories[k]), 1),
                }
            )
        return points


# --------------------------------------------------------------------------- report


def _fmt(est: Any, scale: float = 100.0) -> str:
    return f"{est.mean * scale:.1f} [{est.lo * scale:.1f}, {est.hi * scale:.1f}]"


def report(
    bench: Bench,
    results: dict[str, list[Trajectory]],
    info: dict[str, Any],
    curve_pts: list[dict[str, Any]],
    train: list[Trajectory],
    wall: float,
    adapt_pts: list[dict[str, Any]] | None = None,
) -> None:
    a, out = bench.args, bench.out
    metrics = {arm: arm_metrics(arm, ts) for arm, ts in results.items()}
    comps = {}
    for base in ("no_memory", "raw_retrieval"):
        if "evolve" in results and base in results:
            comps[base] = compare("evolve", results["evolve"], base, results[base])
    cols = [
        "arm",
        "episodes",
        "success % [95% CI]",
        "score 0-100 [95% CI]",
        "steps",
        "steps (won)",
        "tokens/action (prompt+gen)",
        "s/action p50",
        "errors",
    ]
    rows = []
    for arm, m in metrics.items():
        rows.append(
            [
                arm,
                m.episodes,
                _fmt(m.success),
                _fmt(m.score, 1.0),
                f"{m.steps_mean:.1f}",
                None if m.steps_success_mean is None else f"{m.steps_success_mean:.1f}",
                f"{m.prompt_tokens_per_step:.0f}+{m.completion_tokens_per_step:.0f}",
                f"{m.latency_p50_s:.2f}",
                m.errors,
            ]
        )
    n_own = sum(1 for t in train if t.run_id == "train:own")
    n_orc = sum(1 for t in train if t.run_id == "train:oracle")
    src = f"{n_own} base-policy episodes ({sum(t.success for t in train if t.run_id == 'train:own')} won)" + (
        f" + {n_orc} oracle demos" if n_orc else ""
    )
    caption = (
        f"{a.env} test: {len(bench.tasks['test'])} tasks x {a.trials} seeds, max {a.max_steps} steps, "
        f"policy {a.policy}; knowledge ({a.knowledge}) from {src} on {len(bench.tasks['train'])} train tasks, "
        f"probation on {len(bench.tasks['dev'])} dev tasks"
    )
    md = [
        f"# Evolution benchmark: {bench.ns}",
        "",
        print_table("Held-out results per arm", cols, rows, console=CONSOLE, caption=caption),
    ]
    if comps:
        crow = [
            [f"evolve - {b}", c.paired_episodes, _fmt(c.success_delta), _fmt(c.score_delta, 1.0)]
            for b, c in comps.items()
        ]
        md += [
            "",
            print_table(
                "Paired differences (same task, same seed)",
                ["comparison", "pairs", "success pts [95% CI]", "score pts [95% CI]"],
                crow,
                console=CONSOLE,
            ),
        ]
    k = info.get("counts", {})
    krow = [[kind, c.get("candidate", 0), c.get("active", 0), c.get("retired", 0)] for kind, c in k.items()]
    md += [
        "",
        print_table(
            "Knowledge after distill + probation",
            ["kind", "candidate", "active", "retired"],
            krow,
            console=CONSOLE,
            caption=f"probation: {json.dumps(info.get('probation', {}), default=str)[:300]}",
        ),
    ]
    causes = {arm: m.failure_causes for arm, m in metrics.items()}
    all_causes = sorted(
        {c for v in causes.values() for c in v}, key=lambda c: -sum(v.get(c, 0) for v in causes.values())
    )
    if all_causes:
        ccols = ["failure cause (failed episodes)", *causes]
        crow2 = [[c, *[causes[arm].get(c, 0) for arm in causes]] for c in all_causes]
        md += ["", print_table("Failure causes per arm (episode diagnoses)", ccols, crow2, console=CONSOLE)]
    if curve_pts:
        prow = [
            [
                p["train_episodes"],
                p["train_successes"],
                p["skills"],
                p["guardrails"],
                p["episodes"],
                f"{p['success']:.1f} [{p['lo']:.1f}, {p['hi']:.1f}]",
            ]
            for p in curve_pts
        ]
        md += [
            "",
            print_table(
                "Success as knowledge accumulates (unprobated snapshots, test subset, 1 seed)",
                ["train episodes", "won", "skills", "guardrails", "test episodes", "success %"],
                prow,
                console=CONSOLE,
            ),
        ]
    if adapt_pts:
        arow = [
            [
                p["trial"],
                p["episodes"],
                f"{p['success']:.1f} [{p['success_lo']:.1f}, {p['success_hi']:.1f}]",
                f"{p['score']:.1f} [{p['score_lo']:.1f}, {p['score_hi']:.1f}]",
                f"{p['steps']:.1f}",
                f"{p['memories']:.1f}",
            ]
            for p in adapt_pts
        ]
        md += [
            "",
            print_table(
                f"ADAPT: same task, {a.adapt_trials} trials, memory carried (start: {a.adapt_start})",
                ["trial", "tasks", "success % [95% CI]", "score 0-100 [95% CI]", "steps", "memories"],
                arow,
                console=CONSOLE,
            ),
        ]
    # Plots.
    pngs = []
    setup = f"{a.model or a.policy} policy, {len(bench.tasks['test'])} tasks x {a.trials}"
    if metrics:
        pngs.append(
            bars_with_ci(
                {
                    arm: (m.success.mean * 100, m.success.lo * 100, m.success.hi * 100)
                    for arm, m in metrics.items()
                },
                out / "success.png",
                f"{a.env} held-out success ({setup})",
                "success %",
            )
        )
        pngs.append(
            bars_with_ci(
                {arm: (m.score.mean, m.score.lo, m.score.hi) for arm, m in metrics.items()},
                out / "score.png",
                f"{a.env} held-out score ({setup})",
                "score 0-100",
            )
        )
    if curve_pts:
        refs = {f"{arm} (full test)": m.success.mean * 100 for arm, m in metrics.items() if arm != "evolve"}
        pngs.append(
            curve(
                [(p["train_episodes"], p["success"], p["lo"], p["hi"]) for p in curve_pts],
                out / "curve.png",
                "success as knowledge accumulates",
                "train episodes distilled",
                "success %",
                refs,
            )
        )
    if adapt_pts:
        pngs.append(
            curves(
                {
                    "score 0-100": [
                        (p["trial"], p["score"], p["score_lo"], p["score_hi"]) for p in adapt_pts
                    ],
                    "success %": [
                        (p["trial"], p["success"], p["success_lo"], p["success_hi"]) for p in adapt_pts
                    ],
                },
                out / "adapt.png",
                f"ADAPT: same {a.env} task over trials, memory carried ({len(bench.tasks['test'][: a.adapt_tasks])} tasks)",
                "trial",
                "% (95% CI over tasks)",
            )
        )
    if any(causes.values()):
        pngs.append(grouped_counts(causes, out / "causes.png", "failure causes of failed episodes"))
    md += ["", f"Wall time {wall / 60:.1f} min. Plots: " + ", ".join(p.name for p in pngs)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    payload = {
        "namespace": bench.ns,
        "args": vars(a),
        "arms": {arm: m.model_dump() for arm, m in metrics.items()},
        "comparisons": {b: c.model_dump() for b, c in comps.items()},
        "knowledge": info,
        "curve": curve_pts,
        "adapt": adapt_pts or [],
        "wall_s": wall,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nreport: {out / 'report.md'}; plots: {', '.join(str(p) for p in pngs)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    bench = Bench(args)
    log = bench.log
    log(
        f"[{bench.ns}] train {len(bench.tasks['train'])} / dev {len(bench.tasks['dev'])} / test {len(bench.tasks['test'])} tasks"
    )
    log("1/4 experience on train tasks")
    train = bench.experience()
    log(f"  {len(train)} train episodes, {sum(t.success for t in train)} won")
    log("2/4 distill + probation")
    info = bench.knowledge(train)
    log(f"  {json.dumps(info, default=str)}")
    log("3/4 arms on held-out test tasks")
    results = {}
    for arm in [] if args.skip_arms else [x.strip() for x in args.arms.split(",") if x.strip()]:
        results[arm] = bench.arm(arm, train)
        s = sum(t.success for t in results[arm])
        log(f"  {arm}: {s}/{len(results[arm])} won")
    log("4/4 learning curve")
    pts = bench.learning_curve(train)
    if args.adapt_tasks:
        log(f"5/5 ADAPT curve: {args.adapt_tasks} tasks x {args.adapt_trials} trials")
    adapt_pts = bench.adapt()
    report(bench, results, info, pts, train, time.perf_counter() - t0, adapt_pts)
    bench.store.close()


if __name__ == "__main__":
    main()
