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
from evolve.errors import ConfigError
from evolve.schema import Outcome, Split, Trajectory
from evolve.stores import ExperienceStore, make_embedder

log = logging.getLogger("evolve.pipeline")


class Ctx:
    """What every stage needs: the job, the store, the run id, where to write, how to talk."""

    def __init__(self, cfg: JobConfig, store: ExperienceStore, run_id: str, console: Console):
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.console = console
        self.ns = cfg.store.namespace
        self.run_dir = cfg.run_path

    @property
    def env_spec(self) -> dict[str, Any]:
        return {"name": self.cfg.env.name, "kwargs": dict(self.cfg.env.kwargs)}

    def policy(self, key: str) -> dict[str, Any]:
        return self.cfg.policies[key].model_dump(exclude_none=True)

    def done_keys(self, arm: str) -> set[tuple[str, int | None]]:
        rows = self.store.conn.execute(
            "SELECT task_id, seed FROM trajectories WHERE namespace = ? AND run_id = ? AND arm = ?",
            [self.ns, self.run_id, arm],
        ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def trajs(self, arm: str | None = None, split: str | None = None) -> list[Trajectory]:
        return self.store.trajectories(self.ns, run_id=self.run_id, arm=arm, split=split)


def _tasks(ctx: Ctx, split: str, episodes: int | None) -> list[str]:
    from evolve.envs import make_env

    env = make_env(ctx.cfg.env.name, **ctx.cfg.env.kwargs)
    try:
        tasks = env.tasks(Split(split))
    finally:
        env.close()
    ids = [t.id for t in tasks]
    if episodes is not None:
        ids = ids[:episodes]
    if not ids:
        raise ConfigError(f"env '{ctx.cfg.env.name}' has no tasks in split '{split}'; check env.kwargs")
    return ids


def _episodes(
    ctx: Ctx,
    *,
    arm: str,
    policy_key: str,
    split: str,
    task_ids: list[str],
    seeds: list[int],
    max_steps: int,
    workers: int,
    hooks_factory: Any = None,
) -> list[Trajectory]:
    """Run the missing (task, seed) episodes of an arm; already-recorded ones are kept, not rerun."""
    from evolve.agents.collect import collect

    done = ctx.done_keys(arm)
    for seed in seeds:
        todo = [t for t in task_ids if (t, seed) not in done]
        if not todo:
            continue
        ctx.console.print(
            f"[cyan]{arm}[/]: {len(todo)} episodes on {split} (seed {seed}, policy {policy_key})"
        )
        collect(
            ctx.env_spec,
            ctx.policy(policy_key),
            split=split,
            tasks=todo,
            workers=workers,
            store=ctx.store,
            namespace=ctx.ns,
            run_id=ctx.run_id,
            max_steps=max_steps,
            hooks_factory=hooks_factory,
            arm=arm,
            seed=seed,
            progress=True,
        )
    keep = set(task_ids)
    return [t for t in ctx.trajs(arm=arm) if t.task_id in keep and t.seed in seeds]


# --------------------------------------------------------------------------------------- stages
def stage_collect(ctx: Ctx) -> dict[str, Any]:
    st = ctx.cfg.stages.collect
    assert st is not None
    task_ids = _tasks(ctx, st.split, st.episodes)
    out: dict[str, Any] = {}
    for key in [st.policy, *st.also]:
        trajs = _episodes(
            ctx,
            arm=f"collect:{key}",
            policy_key=key,
            split=st.split,
            task_ids=task_ids,
            seeds=st.seeds,
            max_steps=st.max_steps,
            workers=st.workers,
        )
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
    """Distill knowledge from ``trajs`` into the store, then run probation on held-out tasks."""
    from evolve.skills import distill_knowledge, run_probation

    st = ctx.cfg.stages.distill
    assert st is not None
    skills, guards = distill_knowledge(trajs, store=ctx.store, namespace=ctx.ns, min_support=st.min_support)
    info: dict[str, Any] = {"skills": len(skills), "guardrails": len(guards)}
    if st.probation.enabled and (skills or guards):
        task_ids = _tasks(ctx, st.probation.split, st.probation.episodes)
        policy_key = ctx.cfg.stages.eval.policy if ctx.cfg.stages.eval else "student"
        emb = ctx.cfg.store.embedder

        def runner(knowledge: list[Any] | None, tasks: list[str], arm: str) -> list[Trajectory]:
            factory = None if knowledge is None else _evolve_factory(knowledge, emb)
            return _episodes(
                ctx,
                arm=f"probation:{tag}:{arm}",
                policy_key=policy_key,
                split=st.probation.split,
                task_ids=tasks,
                seeds=st.probation.seeds,
                max_steps=ctx.cfg.stages.eval.max_steps if ctx.cfg.stages.eval else 40,
                workers=ctx.cfg.stages.eval.workers if ctx.cfg.stages.eval else 1,
                hooks_factory=factory,
            )

        info["probation"] = run_probation(ctx.store, [*skills, *guards], runner, task_ids, namespace=ctx.ns)
    return info


def _evolve_factory(knowledge: list[Any], embedder: str) -> Any:
    from evolve.skills import EvolveMemory

    return EvolveMemory.factory(knowledge, embedder=embedder)


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
    from evolve.envs import make_env

    env = make_env(ctx.cfg.env.name, **ctx.cfg.env.kwargs)
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
    from evolve.eval.harness import evaluate_job

    return evaluate_job(ctx)


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
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_log(run_dir / "run.log")
    embedder = make_embedder(None if cfg.store.embedder == "default" else cfg.store.embedder)
    store = ExperienceStore(cfg.store_path, namespace=cfg.store.namespace, embedder=embedder)
    result: dict[str, Any] = {"run_id": run_id, "stages": {}}
    try:
        if fresh:
            with store.transaction():
                store.conn.execute("DELETE FROM run_stages WHERE run_id = ?", [run_id])
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


__all__ = ["Outcome", "run_job"]
