"""Write ``report.md``, ``metrics.json`` and PNG plots for an evaluation into a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from evolve.eval.metrics import ArmMetrics, Comparison


class CurvePoint(BaseModel):
    train_episodes: int
    success: float
    lo: float
    hi: float
    skills: int = 0
    guardrails: int = 0


class EvalReport(BaseModel):
    title: str
    env: str
    split: str
    policy: str
    arms: list[ArmMetrics]
    comparisons: list[Comparison] = Field(default_factory=list)
    curve: list[CurvePoint] = Field(default_factory=list)
    knowledge: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def table_md(self) -> str:
        rows = [
            "| arm | episodes | success % [95% CI] | goal success % | score (0-100) | steps | "
            "tokens/step (in/out) | latency p50 s | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in self.arms:
            rows.append(
                f"| {m.arm} | {m.episodes} | {m.success.fmt(100)} | {m.goal_success.mean * 100:.1f} | "
                f"{m.score.fmt()} | {m.steps_mean:.1f} | {m.prompt_tokens_per_step:.0f}/"
                f"{m.completion_tokens_per_step:.0f} | {m.latency_p50_s:.3f} | {m.errors} |"
            )
        return "\n".join(rows)


def _plot_success(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [m.arm for m in report.arms]
    mean = [100 * m.success.mean for m in report.arms]
    err = [
        [100 * (m.success.mean - m.success.lo) for m in report.arms],
        [100 * (m.success.hi - m.success.mean) for m in report.arms],
    ]
    colors = {"no_memory": "#9e9e9e", "raw_retrieval": "#64b5f6", "evolve": "#43a047", "oracle": "#ffb300"}
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    bars = ax.bar(arms, mean, yerr=err, capsize=6, color=[colors.get(a, "#7e57c2") for a in arms])
    for b, v in zip(bars, mean):
        ax.text(
            b.get_x() + b.get_width() / 2,
            1.5,
            f"{v:.0f}%",
            ha="center",
            va="bottom",
            color="white",
            fontweight="bold",
        )
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate, % (95% bootstrap CI)")
    n = report.arms[0].episodes if report.arms else 0
    ax.set_title(f"{report.env} {report.split}: {report.policy}, {n} episodes per arm", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curve(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.train_episodes for p in report.curve]
    ys = [100 * p.success for p in report.curve]
    lo = [100 * p.lo for p in report.curve]
    hi = [100 * p.hi for p in report.curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.fill_between(xs, lo, hi, alpha=0.2, color="#43a047")
    ax.plot(xs, ys, "o-", color="#43a047", label="evolve (skills + guardrails)")
    base = next((m for m in report.arms if m.arm == "no_memory"), None)
    if base is not None:
        ax.axhline(100 * base.success.mean, ls="--", color="#9e9e9e", label="no memory")
    ax.set_xlabel("train episodes distilled into knowledge")
    ax.set_ylabel(f"{report.split} success rate, %")
    ax.set_ylim(0, 105)
    ax.set_title("Learning curve: success as knowledge accumulates", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_causes(report: EvalReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    causes = sorted({c for m in report.arms for c in m.failure_causes})
    if not causes:
        causes = ["none"]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    width = 0.8 / max(len(report.arms), 1)
    x = np.arange(len(causes))
    for i, m in enumerate(report.arms):
        ax.bar(x + i * width, [m.failure_causes.get(c, 0) for c in causes], width, label=m.arm)
    ax.set_xticks(x + width * (len(report.arms) - 1) / 2)
    ax.set_xticklabels(causes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("failed episodes with this cause")
    ax.set_title("Where failures come from (diagnosis taxonomy)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": out / "metrics.json",
        "report": out / "report.md",
        "success": out / "success_by_arm.png",
        "causes": out / "failure_causes.png",
    }
    files["metrics"].write_text(report.model_dump_json(indent=2))
    _plot_success(report, files["success"])
    _plot_causes(report, files["causes"])
    if report.curve:
        files["curve"] = out / "learning_curve.png"
        _plot_curve(report, files["curve"])
    md = [
        f"# {report.title}",
        "",
        f"Env `{report.env}`, split `{report.split}`, policy `{report.policy}`.",
        "",
    ]
    md += [report.table_md(), ""]
    if report.comparisons:
        md += ["Paired comparisons (same tasks and seeds; difference in points, 95% bootstrap CI):", ""]
        md += ["| a vs b | paired episodes | success delta | score delta |", "|---|---|---|---|"]
        for c in report.comparisons:
            md.append(
                f"| {c.a} vs {c.b} | {c.paired_episodes} | {c.success_delta.fmt(100)} | {c.score_delta.fmt()} |"
            )
        md.append("")
    md += ["![success by arm](success_by_arm.png)", ""]
    if report.curve:
        md += [
            "## Learning curve",
            "",
            "| train episodes | skills | guardrails | success % [95% CI] |",
            "|---|---|---|---|",
        ]
        for p in report.curve:
            md.append(
                f"| {p.train_episodes} | {p.skills} | {p.guardrails} | {100 * p.success:.1f} "
                f"[{100 * p.lo:.1f}, {100 * p.hi:.1f}] |"
            )
        md += ["", "![learning curve](learning_curve.png)", ""]
    md += [
        "## Failure causes",
        "",
        "| cause | " + " | ".join(m.arm for m in report.arms) + " |",
        "|---|" + "---|" * len(report.arms),
    ]
    causes = sorted({c for m in report.arms for c in m.failure_causes})
    for c in causes:
        md.append(f"| {c} | " + " | ".join(str(m.failure_causes.get(c, 0)) for m in report.arms) + " |")
    md += ["", "![failure causes](failure_causes.png)", ""]
    if report.knowledge:
        md += ["## Knowledge", "", "```json", json.dumps(report.knowledge, indent=2, default=str), "```", ""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    files["report"].write_text("\n".join(md))
    return files
