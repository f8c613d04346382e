"""`evolve run`: the stages of a job wired from a JobConfig. A recipe: read it top to bottom.

collect -> diagnose -> distill -> synth -> train -> eval

Every stage writes its outputs keyed by (run id, stage) in DuckDB transactions and marks itself
done last, so a rerun after a crash or ``kill -9`` skips finished stages and, inside collect and
eval, skips finished episodes: nothing is lost and nothing is recorded twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from evolve.config import JobConfig
from evolve.envs import build_env
from evolve.errors import ConfigError
from evolve.eval import Episodes, Memory, ProbationRunner, record_usage, task_ids
from evolve.schema import Knowledge, Outcome, Split, Trajectory
from evolve.specs import EnvSpec
from evolve.stores import ExperienceStore, make_embedder

log = logging.getLogger("evolve.pipeline")


def memory_for(
    store: ExperienceStore,
    namespace: str,
    embedder: str,
    *,
    env: str | None = None,
    config: Any = None,
    raw_kwargs: dict[str, Any] | None = None,
) -> Memory:
    """The skills package wired into the eval harness: evolve / raw-trajectory hooks, snapshots
    distilled from trajectories alone (items the store retired left out), usage per item."""
    from evolve.skills import EvolveMemory, RawTrajectoryMemory, distill_snapshot, usage_from_trajectories

    evolve_kw: dict[str, Any] = {"embedder": embedder}
    if env is not None:
        evolve_kw["env"] = env
    if config is not None:
        evolve_kw["config"] = config
    return Memory(
        evolve=lambda knowledge: EvolveMemory.factory(list(knowledge), **evolve_kw),
        raw=lambda trajs: RawTrajectoryMemory.factory(list(trajs), embedder=embedder, **(raw_kwargs or {})),
        distill=lambda trajs: list(distill_snapshot(trajs, store, namespace)),
        usage=usage_from_trajectories,
    )


def active_knowledge(store: ExperienceStore, namespace: str) -> list[Knowledge]:
    return [*store.skills(namespace, status="active"), *store.guardrails(namespace, status="active")]


class Ctx:
    """What every stage needs: the job, the store, the run id, where to write, how to talk."""

    def __init__(self, cfg: JobConfig, store: ExperienceStore, run_id: str, console: Console):
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.console = console
        self.ns = cfg.store.namespace
        self.run_dir = cfg.run_path
        self.memory = memory_for(store, self.ns, cfg.store.embedder)

    @property
    def env_spec(self) -> EnvSpec:
        return EnvSpec(name=self.cfg.env.name, kwargs=dict(self.cfg.env.kwargs))

    def policy(self, key: str) -> dict[str, Any]:
        return self.cfg.policies[key].model_dump(exclude_none=True)

    def trajs(self, arm: str | None = None, split: str | None = None) -> list[Trajectory]:
        return self.store.trajectories(self.ns, run_id=self.run_id, arm=arm, split=split)

    def episodes(
        self, policy_key: str, *, split: str, seeds: list[int], max_steps: int, workers: int
    ) -> Episodes:
        """Episodes of this run with the policy ``policy_key``; finished ones are never rerun."""

        def announce(arm: str, n: int, seed: int) -> None:
            self.console.print(f"[cyan]{arm}[/]: {n} episodes on {split} (seed {seed})")

        return Episodes(
            self.store,
            self.env_spec,
            self.policy(policy_key),
            namespace=self.ns,
            run_id=self.run_id,
            split=split,
            seeds=seeds,
            max_steps=max_steps,
            workers=workers,
            announce=announce,
        )


# --------------------------------------------------------------------------------------- stages
def stage_collect(ctx: Ctx) -> dict[str, Any]:
    st = ctx.cfg.stages.collect
    assert st is not None
    ids = task_ids(ctx.env_spec, st.split, st.episodes)
    out: dict[str, Any] = {}
    for key in [st.policy, *st.also]:
        episodes = ctx.episodes(
            key, split=st.split, seeds=st.seeds, max_steps=st.max_steps, workers=st.workers
        )
        trajs = episodes.run(f"collect:{key}", ids)
        out[key] = {"episodes": len(trajs), "success": sum(t.success for t in trajs)}
    return out


def _collected(ctx: Ctx) -> list[Trajectory]:
    return [t for t in ctx.trajs() if t.arm.startswith("collect:")]


def stage_diagnose(ctx: Ctx) -> dict[str, Any]:
    from evolve.diagnose import diagnose_trajectory

    st = ctx.cfg.stages.diagnose
    step_limit = ctx.cfg.stages.collect.max_steps if ctx.cfg.stages.collect else None
    trajs = [diagnose_trajectory(t, step_limit=step_limit) for t in _collected(ctx)]
    if st is not None and st.llm is not None:
        from evolve.diagnose import LLMDiagnoser

        llm = LLMDiagnoser(st.llm.model or "", st.llm.base_url, api_key_env=st.llm.api_key_env)
        trajs = [llm.diagnose_trajectory(t, step_limit=step_limit) if not t.success else t for t in trajs]
    ctx.store.add_trajectories(trajs)  # replaces by id, in one transaction
    causes: dict[str, int] = {}
    for t in trajs:
        if t.diagnosis and not t.success:
            for c in t.diagnosis.cause_names():
                causes[c] = causes.get(c, 0) + 1
    return {"episodes": len(trajs), "failed": sum(not t.success for t in trajs), "causes": causes}


def _distill(ctx: Ctx, trajs: list[Trajectory], tag: str) -> dict[str, Any]:
    """Distill knowledge from ``trajs`` into the store, run probation on held-out tasks, and write
    the probation episodes' usage back to the store."""
    from evolve.skills import distill_knowledge, run_probation

    st = ctx.cfg.stages.distill
    assert st is not None
    skills, guards = distill_knowledge(trajs, store=ctx.store, namespace=ctx.ns, min_support=st.min_support)
    info: dict[str, Any] = {"skills": len(skills), "guardrails": len(guards)}
    if st.probation.enabled and (skills or guards):
        ev = ctx.cfg.stages.eval
        episodes = ctx.episodes(
            ev.policy if ev else "student",
            split=st.probation.split,
            seeds=st.probation.seeds,
            max_steps=ev.max_steps if ev else 40,
            workers=ev.workers if ev else 1,
        )
        runner = ProbationRunner(episodes, ctx.memory, label=lambda arm, _k: f"probation:{tag}:{arm}")
        ids = task_ids(ctx.env_spec, st.probation.split, st.probation.episodes)
        info["probation"] = run_probation(ctx.store, [*skills, *guards], runner, ids, namespace=ctx.ns)
        info["usage_written"] = record_usage(
            ctx.store,
            ctx.memory,
            runner.trajectories,
            run_id=ctx.run_id,
            label=f"probation:{tag}",
            namespace=ctx.ns,
        )
    return info


def stage_distill(ctx: Ctx) -> dict[str, Any]:
    return _distill(ctx, [t for t in _collected(ctx) if t.split == Split.train], tag="main")


def stage_synth(ctx: Ctx) -> dict[str, Any]:
    from evolve.synth import privileged_examples, sft_examples

    st = ctx.cfg.stages.synth
    assert st is not None
    trajs = _collected(ctx)
    examples = []
    if "sft" in st.kinds:
        examples += sft_examples(trajs, namespace=ctx.ns)
    if "privileged" in st.kinds:
        skills = ctx.store.skills(ctx.ns, status="active")
        examples += privileged_examples(
            [t for t in trajs if not t.success], _privileged(ctx, trajs), skills, namespace=ctx.ns
        )
    ctx.store.add_examples(examples)
    kinds: dict[str, int] = {}
    for e in examples:
        kinds[e.kind.value] = kinds.get(e.kind.value, 0) + 1
    return {"examples": kinds}


def _privileged(ctx: Ctx, trajs: list[Trajectory]) -> dict[str, Any]:
    env = build_env(ctx.env_spec)
    out = {}
    try:
        for tid in sorted({t.task_id for t in trajs if not t.success}):
            env.reset(tid)
            out[tid] = env.privileged()
    finally:
        env.close()
    return out


def stage_train(ctx: Ctx) -> dict[str, Any]:
    raise ConfigError(
        "stage 'train' is not available yet (the trainer arrives in a later release); "
        "remove 'train' from stages — synth already stores the training examples"
    )


def stage_eval(ctx: Ctx) -> dict[str, Any]:
    """Every configured arm on the eval split (resumably), the learning curve, usage written back,
    then report.md + plots."""
    from evolve.eval import (
        EvalReport,
        arm_metrics,
        compare_arms,
        knowledge_counts,
        learning_curve,
        print_report,
        run_arms,
        write_report,
    )

    st = ctx.cfg.stages.eval
    assert st is not None
    ids = task_ids(ctx.env_spec, st.split, st.episodes)
    train = [t for t in ctx.trajs() if t.arm.startswith("collect:") and t.split == Split.train]
    episodes = ctx.episodes(
        st.policy, split=st.split, seeds=st.seeds, max_steps=st.max_steps, workers=st.workers
    )
    oracle = next((k for k, p in ctx.cfg.policies.items() if p.kind == "oracle"), None)
    results = run_arms(
        episodes,
        ctx.memory,
        st.arms,
        ids,
        knowledge=active_knowledge(ctx.store, ctx.ns),
        train=train,
        policies={"oracle": ctx.policy(oracle)} if oracle else {},
    )
    used = record_usage(
        ctx.store,
        ctx.memory,
        [t for trajs in results.values() for t in trajs],
        run_id=ctx.run_id,
        label="eval",
        namespace=ctx.ns,
    )
    curve = []
    if st.learning_curve:
        order = sorted(train, key=lambda t: (t.created_at, t.id))
        curve = learning_curve(episodes, ctx.memory, order, st.learning_curve, ids, n_boot=st.bootstrap)
    arms = [arm_metrics(a, ts, st.bootstrap) for a, ts in results.items()]
    distill = ctx.cfg.stages.distill
    report = EvalReport(
        title=f"evolve eval: {ctx.cfg.name}",
        env=ctx.cfg.env.name,
        split=st.split,
        policy=f"{st.policy} ({ctx.cfg.policies[st.policy].kind})",
        arms=arms,
        comparisons=compare_arms(results, st.bootstrap),
        curve=curve,
        knowledge={"counts": knowledge_counts(ctx.store, ctx.ns), "train_episodes": len(train)},
        notes=[
            f"Held-out tasks: {len(ids)} x seeds {st.seeds}; knowledge distilled from train episodes only, "
            f"activated by probation on {distill.probation.split if distill else '-'} tasks.",
            f"Run id {ctx.run_id}; trajectories are in {ctx.cfg.store_path} (namespace {ctx.ns}).",
        ],
    )
    files = write_report(report, ctx.run_dir)
    print_report(report, ctx.console)
    return {
        "report": str(files["report"]),
        "success": {m.arm: round(m.success.mean, 3) for m in arms},
        "episodes_per_arm": len(ids) * len(st.seeds),
        "usage_written": used,
    }


STAGE_FNS = {
    "collect": stage_collect,
    "diagnose": stage_diagnose,
    "distill": stage_distill,
    "synth": stage_synth,
    "train": stage_train,
    "eval": stage_eval,
}


def run_job(
    cfg: JobConfig,
    stages: list[str] | None = None,
    run_id: str | None = None,
    fresh: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the job's enabled stages in order, skipping stages this run already finished."""
    console = console or Console()
    enabled = cfg.stages.enabled()
    if stages:
        bad = [s for s in stages if s not in STAGE_FNS]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages are: {', '.join(STAGE_FNS)}")
        missing = [s for s in stages if s not in enabled]
        if missing:
            raise ConfigError(
                f"stage(s) {missing} are not configured in this job (it has: {', '.join(enabled)})"
            )
        enabled = [s for s in enabled if s in stages]
    run_id = run_id or cfg.name
    run_dir = cfg.run_path
    store = _open_store(cfg)
    result: dict[str, Any] = {"run_id": run_id, "stages": {}}
    try:
        if fresh:
            store.reset_stages(run_id)
        store.upsert_run(run_id, cfg.model_dump(mode="json"), "running", cfg.store.namespace)
        ctx = Ctx(cfg, store, run_id, console)
        done = store.stages(run_id)
        console.rule(f"[bold]evolve run[/] {cfg.name}  (run id {run_id}, store {cfg.store_path})")
        for name in enabled:
            if done.get(name, {}).get("status") == "done" and not (stages and name in stages):
                console.print(f"[dim]{name}: done earlier, skipped[/]")
                result["stages"][name] = done[name]["data"]
                continue
            t0 = time.time()
            console.rule(f"[bold]{name}")
            log.info("stage %s start", name)
            store.set_stage(run_id, name, "running")
            data = STAGE_FNS[name](ctx)
            data["seconds"] = round(time.time() - t0, 1)
            store.set_stage(run_id, name, "done", data)
            log.info("stage %s done %s", name, data)
            result["stages"][name] = data
            console.print(f"[green]{name} done[/] in {data['seconds']} s: {_short(data)}")
        store.upsert_run(run_id, cfg.model_dump(mode="json"), "done", cfg.store.namespace)
        report = run_dir / "report.md"
        if report.exists():
            result["report"] = str(report)
    except BaseException:
        store.upsert_run(run_id, cfg.model_dump(mode="json"), "failed", cfg.store.namespace)
        raise
    finally:
        store.close()
    return result


def adapt_job(
    cfg: JobConfig,
    tasks: int,
    trials: int = 5,
    start: str = "empty",
    run_id: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """ADAPT (CLIN's protocol) on the job's eval split: the first ``tasks`` tasks, each over
    ``trials`` trials with the eval policy; before trial k, knowledge is distilled from that task's
    trials 1..k-1 only, on top of nothing (``start="empty"``) or the store's active knowledge
    (``"knowledge"``). Resumable; writes ``<run_dir>/adapt/report.md`` and ``adapt.png``."""
    from evolve.eval import EvalReport, adapt, print_report, write_report

    console = console or Console()
    st = cfg.stages.eval
    if st is None:
        raise ConfigError(
            "evolve eval --adapt needs stages.eval in the job (its policy, split and max_steps)"
        )
    if start not in ("empty", "knowledge"):
        raise ConfigError(f"--adapt-start must be 'empty' or 'knowledge', got {start!r}")
    if tasks < 1:
        raise ConfigError(f"--adapt needs at least one task, got {tasks}")
    run_id = run_id or cfg.name
    store = _open_store(cfg)
    try:
        ctx = Ctx(cfg, store, run_id, console)
        ids = task_ids(ctx.env_spec, st.split, tasks)
        base = active_knowledge(store, ctx.ns) if start == "knowledge" else []
        episodes = ctx.episodes(
            st.policy, split=st.split, seeds=st.seeds[:1], max_steps=st.max_steps, workers=1
        )
        console.rule(f"[bold]ADAPT[/] {cfg.name}: {len(ids)} tasks x {trials} trials, memory starts {start}")
        points = adapt(
            episodes,
            ctx.memory,
            ids,
            trials=trials,
            seed=st.seeds[0],
            base_knowledge=base,
            label=lambda k: f"adapt:{start}:{k}",
            n_boot=st.bootstrap,
            log=lambda msg: console.print(f"[dim]{msg}[/]"),
        )
        used = 0
        if base:
            trajs = [t for k in range(1, trials + 1) for t in ctx.trajs(arm=f"adapt:{start}:{k}")]
            used = record_usage(store, ctx.memory, trajs, run_id=run_id, label="adapt", namespace=ctx.ns)
        report = EvalReport(
            title=f"evolve ADAPT: {cfg.name}",
            env=cfg.env.name,
            split=st.split,
            policy=f"{st.policy} ({cfg.policies[st.policy].kind})",
            adapt=points,
            adapt_title=f"ADAPT: same task, {trials} trials, memory carried (start: {start})",
            notes=[f"Run id {run_id}; trajectories are in {cfg.store_path} (namespace {ctx.ns})."],
        )
        files = write_report(report, cfg.run_path / "adapt")
        print_report(report, console, detailed=True)
    finally:
        store.close()
    return {"report": str(files["report"]), "adapt": [p.model_dump() for p in points], "usage_written": used}


def _open_store(cfg: JobConfig) -> ExperienceStore:
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    _setup_log(cfg.run_path / "run.log")
    embedder = make_embedder(None if cfg.store.embedder == "default" else cfg.store.embedder)
    return ExperienceStore(cfg.store_path, namespace=cfg.store.namespace, embedder=embedder)


def _short(data: dict[str, Any]) -> str:
    s = ", ".join(f"{k}={v}" for k, v in data.items() if k != "seconds" and not isinstance(v, (dict, list)))
    return s or ", ".join(data)


def _setup_log(path: Path) -> None:
    root = logging.getLogger("evolve")
    if any(
        isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers
    ):
        return
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.INFO)


__all__ = ["Ctx", "Outcome", "active_knowledge", "adapt_job", "memory_for", "run_job"]
