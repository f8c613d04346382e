"""The evaluation harness: arms on the same held-out tasks and seeds, metrics, report, plots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evolve.eval.metrics import arm_metrics, compare
from evolve.eval.report import CurvePoint, EvalReport, write_report
from evolve.schema import Split, Trajectory

if TYPE_CHECKING:
    from evolve.pipeline import Ctx


def _hooks_for(ctx: Ctx, arm: str, train: list[Trajectory]) -> Any:
    emb = ctx.cfg.store.embedder
    if arm in ("no_memory", "oracle"):
        return None
    if arm == "raw_retrieval":
        from evolve.skills import RawTrajectoryMemory

        return RawTrajectoryMemory.factory(train, embedder=emb)
    if arm == "evolve":
        from evolve.skills import EvolveMemory

        knowledge = [
            *ctx.store.skills(ctx.ns, status="active"),
            *ctx.store.guardrails(ctx.ns, status="active"),
        ]
        return EvolveMemory.factory(knowledge, embedder=emb)
    raise ValueError(arm)


def evaluate_job(ctx: Ctx) -> dict[str, Any]:
    """Run every configured arm on the eval split (resumably), then write report.md + plots."""
    from evolve.pipeline import _episodes, _tasks

    st = ctx.cfg.stages.eval
    assert st is not None
    task_ids = _tasks(ctx, st.split, st.episodes)
    train = [t for t in ctx.trajs() if t.arm.startswith("collect:") and t.split == Split.train]
    results: dict[str, list[Trajectory]] = {}
    for arm in st.arms:
        policy_key = st.policy
        if arm == "oracle":
            policy_key = next((k for k, p in ctx.cfg.policies.items() if p.kind == "oracle"), None) or ""
            if not policy_key:
                continue
        results[arm] = _episodes(
            ctx,
            arm=f"eval:{arm}",
            policy_key=policy_key,
            split=st.split,
            task_ids=task_ids,
            seeds=st.seeds,
            max_steps=st.max_steps,
            workers=st.workers,
            hooks_factory=_hooks_for(ctx, arm, train),
        )
    curve = _learning_curve(ctx, train, task_ids) if st.learning_curve else []
    arms = [arm_metrics(a, ts, st.bootstrap) for a, ts in results.items()]
    comps = []
    if "evolve" in results:
        for other in ("no_memory", "raw_retrieval"):
            if other in results:
                comps.append(compare("evolve", results["evolve"], other, results[other], st.bootstrap))
    k_stats = {
        "skills": {s: len(ctx.store.skills(ctx.ns, status=s)) for s in ("candidate", "active", "retired")},
        "guardrails": {
            s: len(ctx.store.guardrails(ctx.ns, status=s)) for s in ("candidate", "active", "retired")
        },
        "train_episodes": len(train),
    }
    report = EvalReport(
        title=f"evolve eval: {ctx.cfg.name}",
        env=ctx.cfg.env.name,
        split=st.split,
        policy=f"{st.policy} ({ctx.cfg.policies[st.policy].kind})",
        arms=arms,
        comparisons=comps,
        curve=curve,
        knowledge=k_stats,
        notes=[
            f"Held-out tasks: {len(task_ids)} x seeds {st.seeds}; knowledge distilled from train episodes only, "
            f"activated by probation on {ctx.cfg.stages.distill.probation.split if ctx.cfg.stages.distill else '-'} "
            "tasks.",
            f"Run id {ctx.run_id}; trajectories are in {ctx.cfg.store_path} (namespace {ctx.ns}).",
        ],
    )
    files = write_report(report, ctx.run_dir)
    _print_table(ctx, report)
    return {
        "report": str(files["report"]),
        "success": {m.arm: round(m.success.mean, 3) for m in arms},
        "episodes_per_arm": len(task_ids) * len(st.seeds),
    }


def _learning_curve(ctx: Ctx, train: list[Trajectory], task_ids: list[str]) -> list[CurvePoint]:
    """Success on the eval split when knowledge comes from only the first N train episodes."""
    from evolve.eval.metrics import bootstrap
    from evolve.pipeline import _episodes
    from evolve.skills import EvolveMemory, distill_snapshot

    st = ctx.cfg.stages.eval
    assert st is not None
    order = sorted(train, key=lambda t: (t.created_at, t.id))
    points = []
    for n in st.learning_curve:
        subset = order[: min(n, len(order))]
        knowledge = distill_snapshot(subset, ctx.store, namespace=ctx.ns)
        trajs = _episodes(
            ctx,
            arm=f"curve:{n}",
            policy_key=st.policy,
            split=st.split,
            task_ids=task_ids,
            seeds=st.seeds,
            max_steps=st.max_steps,
            workers=st.workers,
            hooks_factory=EvolveMemory.factory(knowledge, embedder=ctx.cfg.store.embedder),
        )
        est = bootstrap([1.0 if t.success else 0.0 for t in trajs], st.bootstrap)
        points.append(
            CurvePoint(
                train_episodes=len(subset),
                success=est.mean,
                lo=est.lo,
                hi=est.hi,
                skills=sum(1 for k in knowledge if hasattr(k, "preconditions")),
                guardrails=sum(1 for k in knowledge if hasattr(k, "forbidden_action")),
            )
        )
    return points


def _print_table(ctx: Ctx, report: EvalReport) -> None:
    from rich.table import Table

    t = Table(title=f"{report.env} {report.split} — {report.policy}")
    for c in ("arm", "episodes", "success % [95% CI]", "score", "steps", "top failure causes"):
        t.add_column(c)
    for m in report.arms:
        top = ", ".join(f"{k} {v}" for k, v in list(m.failure_causes.items())[:3])
        t.add_row(
            m.arm, str(m.episodes), m.success.fmt(100), f"{m.score.mean:.1f}", f"{m.steps_mean:.1f}", top
        )
    ctx.console.print(t)
