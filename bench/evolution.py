"""Does evolving knowledge help? Arms on held-out tasks, same base policy, same seeds.

Arms (``--arms``; the first three by default):

* ``no_memory``       the base policy alone;
* ``raw_retrieval``   static retrieval of raw past successful trajectories (``RawTrajectoryMemory``):
                      excerpts in the prompt, and replayed actions;
* ``evolve``          skills + guardrails + replanning (``EvolveMemory``) after distillation on the
                      train experience and probation on dev tasks: context, enforced guardrails, and
                      skill steps the memory executes itself;
* ``evolve_context``  evolve's memory as context only: skills and guardrails in the prompt,
                      guardrails and the loop guard enforced, no skill step executed by the memory;
* ``raw_exemplars``   raw retrieval as exemplars only (excerpts, no replayed action).

The last two say where a gain comes from: what the memory *says* to the model against what it
*does* for it (``evolve - evolve_context``, ``evolve_context - no_memory`` in the paired table).

Knowledge is learned on TRAIN tasks only (``--knowledge``: the base policy's own experience,
oracle demos, or both), activated by probation on DEV tasks, and measured on TEST tasks. Every
finished episode is written at once to ``OUT/store.duckdb`` keyed by (arm, task, seed): a rerun
skips what is done (``--arms``, ``--tasks``, ``--trials`` pick subsets). It reports success rate,
score (0-100) and steps with bootstrap 95% CIs, paired deltas, the success curve as knowledge
accumulates, and failure causes per arm; PNGs, ``report.md`` and ``results.json`` go to OUT.
``--adapt-tasks N`` adds CLIN's ADAPT curve (``--adapt-temperature T``: LLM policies sample at T
with the policy seed varying by trial, so trials can differ). A thin script: the arms, probation runner, learning
curve, ADAPT, usage write-back and report are ``evolve.eval``'s, the memory ``evolve.skills``'.

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
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import keep
from rich.console import Console

from evolve.envs import build_env
from evolve.eval import (
    AdaptPoint,
    Episodes,
    EvalReport,
    ProbationRunner,
    adapt,
    arm_metrics,
    compare_arms,
    knowledge_counts,
    learning_curve,
    print_report,
    record_usage,
    run_arms,
    write_report,
)
from evolve.pipeline import memory_for
from evolve.schema import Guardrail, Knowledge, KnowledgeStats, KnowledgeStatus, Skill, Task, Trajectory
from evolve.skills import MemoryConfig, distill_knowledge, knowledge_of, run_probation
from evolve.specs import EnvSpec, PolicySpec
from evolve.stores import ExperienceStore, make_embedder

ARMS = ("no_memory", "raw_retrieval", "evolve", "evolve_context", "raw_exemplars")
DEFAULT_ARMS = ("no_memory", "raw_retrieval", "evolve")
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
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
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
        "--adapt-temperature",
        type=float,
        default=None,
        help="ADAPT only: sample the policy at this temperature, its seed varying with the trial "
        "(default: the policy as the arms run it, greedy and the same seed every trial)",
    )
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
    ap.add_argument(
        "--keep",
        default=None,
        help="a directory kept in git (bench/keep.py): episodes, knowledge and stages are restored from "
        "it at start and saved to it before each pass, so a fresh machine resumes the run",
    )
    ap.add_argument(
        "--redo-knowledge",
        default=None,
        metavar="TAG",
        help="after a change to the memory code: distill again and rerun what uses the knowledge "
        "(probation, the evolve arms, ADAPT), keeping the episodes that do not use it "
        "(train, no_memory, the raw arms); done once per TAG, so the same command resumes",
    )
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


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
    env = build_env(spec)
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


def namespace(args: argparse.Namespace) -> str:
    """Everything that changes what an episode does is in the namespace, so reruns never mix."""
    pol_name = args.policy if args.policy == "random" else f"{args.policy}-{args.model or 'model'}"
    default_ns = (
        f"{args.env}-{pol_name}-{args.knowledge}-s{args.max_steps}"
        + ("-noprop" if args.no_propose else "")
        + (f"-a{args.max_actions}" if args.max_actions != 60 else "")
    )
    return (args.run_name or default_ns).replace("/", "_")


def experience(args: argparse.Namespace, episodes: Episodes, train_tasks: list[Task]) -> list[Trajectory]:
    """Train-task experience, per ``--knowledge``, in the order the learning curve sees it."""
    trajs: list[Trajectory] = []
    if args.knowledge in ("own", "own+oracle"):
        trajs += episodes.run("train:own", train_tasks, trials=args.train_trials)
    if args.knowledge in ("oracle", "own+oracle") and args.oracle_demos > 0:
        demos = train_tasks[: args.oracle_demos]
        trajs += episodes.run("train:oracle", demos, trials=1, policy=PolicySpec(kind="oracle"))
    # The experience stream, task by task (own episodes, then the demo when there is one).
    order = {t.id: i for i, t in enumerate(train_tasks)}
    trajs.sort(
        key=lambda t: (order.get(t.task_id, len(order)), t.run_id == "train:oracle", t.seed or 0, t.id)
    )
    return trajs


def adapt_label(args: argparse.Namespace, trial: int) -> str:
    """The run id of ADAPT trial ``trial``; a sampled run is kept apart from a greedy one."""
    temp = args.adapt_temperature
    return f"adapt:{args.adapt_start}:" + (f"t{temp:g}:" if temp is not None else "") + str(trial)


def _probation_label(arm: str, knowledge: Any) -> str:
    # Each probation evaluation is its own run id: a rerun after a crash resumes it.
    digest = hashlib.sha1(",".join(sorted(k.id for k in knowledge)).encode()).hexdigest()[:10]
    return f"probation:{arm}:{len(knowledge)}-{digest}"


# Run ids whose episodes depend on the memory code (they act with the distilled knowledge): these
# arms, and every run id with these prefixes but probation's runs with no knowledge (its baseline).
KNOWLEDGE_ARMS = ("eval:evolve", "eval:evolve_context")
KNOWLEDGE_PREFIXES = ("probation:", "adapt:", "curve:")


def used_knowledge(run: str) -> bool:
    """Did the episodes of run id ``run`` act with distilled knowledge?"""
    if run.startswith("probation:") and run.endswith(_probation_label("", [])[len("probation::") :]):
        return False  # probation's baseline arm ran without any knowledge
    return run in KNOWLEDGE_ARMS or run.startswith(KNOWLEDGE_PREFIXES)


def redo_knowledge(store: ExperienceStore, ns: str, tag: str, keep_dir: str | None) -> dict[str, int]:
    """Forget what the knowledge did, once per ``tag``, and distill again: the episodes of runs that
    :func:`used_knowledge` (also in ``keep_dir``; probation's no-knowledge baseline stays),
    probation's verdicts (every item back to a candidate with no usage stats: what distillation
    wrote, as its ids come from its content) and the usage write-back;
    distillation then runs again on the same episodes and merges (a changed distiller adds its new
    rules). The episodes that never saw knowledge stay, so only the runs that depend on it rerun."""
    stage = f"redo:{tag}"
    if store.stages(ns).get(stage, {}).get("status") == "done":
        return {}
    runs: dict[str, int] = {}
    for t in store.trajectories(ns):
        run = t.run_id or ""
        if used_knowledge(run):
            store.delete_trajectory(t.id, ns)
            runs[run] = runs.get(run, 0) + 1
    if keep_dir:
        for run in runs:
            keep.run_file(Path(keep_dir), run).unlink(missing_ok=True)
    fresh = {"status": KnowledgeStatus.candidate, "stats": KnowledgeStats()}
    skills = [k.model_copy(update=fresh) for k in store.skills(ns)]
    guards = [k.model_copy(update=fresh) for k in store.guardrails(ns)]
    store.upsert_skills(skills)
    store.upsert_guardrails(guards)
    store.set_stage(ns, "distill", "redo", {"tag": tag})  # distilled again: merged, new rules added
    store.set_stage(ns, "probation", "redo", {"tag": tag})
    store.reset_stages(f"usage:{ns}")
    store.set_stage(
        ns, stage, "done", {"episodes_dropped": runs, "knowledge_reset": len(skills) + len(guards)}
    )
    return {"episodes": sum(runs.values()), "knowledge": len(skills) + len(guards)}


def knowledge(
    args: argparse.Namespace,
    store: ExperienceStore,
    ns: str,
    train: list[Trajectory],
    runner: ProbationRunner,
) -> dict[str, Any]:
    """Distill + merge into the store, then probation on dev (each stage once per namespace)."""
    stages = store.stages(ns)
    info: dict[str, Any] = {}
    if stages.get("distill", {}).get("status") != "done":
        skills, guards = distill_knowledge(train, store=store, namespace=ns)
        info["distilled"] = {"skills": len(skills), "guardrails": len(guards)}
        store.set_stage(ns, "distill", "done", info["distilled"])
    else:
        info["distilled"] = stages["distill"]["data"]
    if stages.get("probation", {}).get("status") != "done":
        cands: list[Knowledge] = knowledge_of(store, ns, ("candidate",))
        if args.no_probation:
            for k in cands:
                k.status = KnowledgeStatus.active
            store.upsert_skills([k for k in cands if isinstance(k, Skill)])
            store.upsert_guardrails([k for k in cands if isinstance(k, Guardrail)])
            summary: dict[str, Any] = {"skipped": True, "promoted": len(cands)}
        else:
            summary = run_probation(store, cands, runner, list(runner.tasks), namespace=ns)
        store.set_stage(ns, "probation", "done", summary)
        info["probation"] = summary
    else:
        info["probation"] = stages["probation"]["data"]
    info["counts"] = knowledge_counts(store, ns)
    return info


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    arms = [] if a.skip_arms else [x.strip() for x in a.arms.split(",") if x.strip()]
    if bad := [x for x in arms if x not in ARMS]:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec, ns = env_spec(a), namespace(a)
    tasks = split_tasks(a, spec)
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, flush=True))
    store = ExperienceStore(out / "store.duckdb", namespace=ns, embedder=make_embedder("hash"))
    if a.keep and any((n := keep.restore(store, ns, a.keep)).values()):
        log(f"  restored {n} from {a.keep}")
    if a.redo_knowledge and (n := redo_knowledge(store, ns, a.redo_knowledge, a.keep)):
        log(
            f"  --redo-knowledge {a.redo_knowledge}: dropped {n['episodes']} episodes that used "
            f"knowledge, {n['knowledge']} items back to candidates"
        )
        if a.keep:
            keep.save(store, ns, a.keep)

    def announce(arm: str, n: int, _seed: int) -> None:
        if a.keep:  # what is done so far, before the next pass runs
            keep.save(store, ns, a.keep)
        log(f"  {arm}: {n} episodes to run")

    memory = memory_for(
        store,
        ns,
        a.embedder,
        env=a.env,
        config=MemoryConfig(propose=not a.no_propose),
        raw_kwargs={"propose": not a.no_propose},
    )
    # Each arm label is its own run id; an episode that ended in error is retried on a rerun.
    episodes = Episodes(
        store,
        spec,
        policy_spec(a),
        namespace=ns,
        seeds=(a.seed,),
        trials=a.trials,
        max_steps=a.max_steps,
        workers=a.workers,
        retry_errors=True,
        progress=not a.quiet and sys.stderr.isatty(),
        announce=announce,
    )
    log(f"[{ns}] train {len(tasks['train'])} / dev {len(tasks['dev'])} / test {len(tasks['test'])} tasks")
    log("1/4 experience on train tasks")
    train = experience(a, episodes, tasks["train"])
    log(f"  {len(train)} train episodes, {sum(t.success for t in train)} won")
    log("2/4 distill + probation")
    runner = ProbationRunner(
        dataclasses.replace(episodes, trials=a.dev_trials), memory, tasks["dev"], _probation_label
    )
    info = knowledge(a, store, ns, train, runner)
    log(f"  {json.dumps(info, default=str)}")
    log("3/4 arms on held-out test tasks")

    def after(arm: str, trajs: list[Trajectory]) -> None:
        log(f"  {arm}: {sum(t.success for t in trajs)}/{len(trajs)} won")
        if arm == "evolve":  # the memory learns from use: uses, successes, failures per item
            record_usage(store, memory, trajs, run_id=ns, label="eval:evolve", namespace=ns)

    results = run_arms(
        episodes, memory, arms, tasks["test"], knowledge=knowledge_of(store, ns), train=train, after=after
    )
    log("4/4 learning curve")
    one_seed = dataclasses.replace(episodes, trials=1)
    curve = []
    if a.curve:
        sizes = [tok for tok in a.curve.split(",") if tok.strip()]
        curve = learning_curve(one_seed, memory, train, sizes, tasks["test"][: a.curve_tasks], log=log)
    adapt_pts: list[AdaptPoint] = []
    if a.adapt_tasks > 0:
        log(f"5/5 ADAPT curve: {a.adapt_tasks} tasks x {a.adapt_trials} trials")
        adapt_pts = adapt(
            one_seed,
            memory,
            tasks["test"][: a.adapt_tasks],
            trials=a.adapt_trials,
            seed=a.seed,
            base_knowledge=knowledge_of(store, ns) if a.adapt_start == "knowledge" else [],
            label=lambda k: adapt_label(a, k),
            log=log,
            temperature=a.adapt_temperature,
            vary_seed=a.adapt_temperature is not None and a.adapt_temperature > 0,
        )
    if a.keep:
        keep.save(store, ns, a.keep)
    report(a, ns, tasks, store, results, info, curve, adapt_pts, train, out, time.perf_counter() - t0)
    store.close()


def report(
    a: argparse.Namespace,
    ns: str,
    tasks: dict[str, list[Task]],
    store: ExperienceStore,
    results: dict[str, list[Trajectory]],
    info: dict[str, Any],
    curve: list[Any],
    adapt_pts: list[AdaptPoint],
    train: list[Trajectory],
    out: Path,
    wall: float,
) -> None:
    arms = [arm_metrics(arm, ts) for arm, ts in results.items()]
    n_own = sum(1 for t in train if t.run_id == "train:own")
    n_orc = sum(1 for t in train if t.run_id == "train:oracle")
    won = sum(t.success for t in train if t.run_id == "train:own")
    src = f"{n_own} base-policy episodes ({won} won)" + (f" + {n_orc} oracle demos" if n_orc else "")
    rep = EvalReport(
        title=f"Evolution benchmark: {ns}",
        env=a.env,
        split="test",
        policy=a.model or a.policy,
        arms=arms,
        comparisons=compare_arms(results),
        curve=curve,
        adapt=adapt_pts,
        adapt_title=f"ADAPT: same task, {a.adapt_trials} trials, memory carried (start: {a.adapt_start}"
        + (f", sampled at T={a.adapt_temperature:g}, seed + trial" if a.adapt_temperature else "")
        + ")",
        knowledge=info,
        caption=(
            f"{a.env} test: {len(tasks['test'])} tasks x {a.trials} seeds, max {a.max_steps} steps, "
            f"policy {a.policy}; knowledge ({a.knowledge}) from {src} on {len(tasks['train'])} train tasks, "
            f"probation on {len(tasks['dev'])} dev tasks"
        ),
        notes=[f"Wall time {wall / 60:.1f} min; store {out / 'store.duckdb'} (namespace {ns})."],
    )
    files = write_report(rep, out)
    print_report(rep, CONSOLE, detailed=True)
    payload = {
        "namespace": ns,
        "args": vars(a),
        "arms": {m.arm: m.model_dump() for m in arms},
        # evolve's comparisons keyed by the other arm (as before the ablation arms), the rest "a-b".
        "comparisons": {
            (c.b if c.a == "evolve" else f"{c.a}-{c.b}"): c.model_dump() for c in rep.comparisons
        },
        "knowledge": info,
        "curve": [p.model_dump() for p in curve],
        "adapt": [
            {
                "trial": p.trial,
                "episodes": p.episodes,
                "success": 100 * p.success.mean,
                "success_lo": 100 * p.success.lo,
                "success_hi": 100 * p.success.hi,
                "score": p.score.mean,
                "score_lo": p.score.lo,
                "score_hi": p.score.hi,
                "steps": p.steps,
                "memories": p.memories,
                "task_scores": p.task_scores,
            }
            for p in adapt_pts
        ],
        "adapt_gain": g.model_dump() if (g := rep.adapt_gain) is not None else None,
        "wall_s": wall,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    pngs = ", ".join(str(p) for k, p in files.items() if p.suffix == ".png")
    print(f"\nreport: {files['report']}; plots: {pngs}")


if __name__ == "__main__":
    main()
