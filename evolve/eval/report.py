"""An evaluation's report: ``report.md``, ``metrics.json``, PNG plots, and the tables on the console.

One report for every harness user: ``evolve run``'s eval stage, ``evolve eval --adapt`` and
``bench/evolution.py`` all fill an :class:`EvalReport` and call :func:`write_report` and
:func:`print_report`. The plot helpers (bars with CIs, curves with CI bands, grouped counts) are
public so benchmark scripts draw with the same code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, computed_field
from rich.console import Console
from rich.table import Table

from evolve.eval.metrics import ArmMetrics, Comparison, Estimate, Gain, paired_gain

Interval = tuple[float, float, float]
"""(mean, lo, hi)"""


class CurvePoint(BaseModel):
    """One point of the learning curve: success with knowledge from the first N train episodes."""

    train_episodes: int
    success: float
    """0-1, like ``lo`` and ``hi`` (95% bootstrap CI)."""
    lo: float
    hi: float
    skills: int = 0
    guardrails: int = 0
    train_successes: int = 0
    episodes: int = 0
    """Evaluation episodes behind this point."""


class AdaptPoint(BaseModel):
    """One trial of ADAPT (CLIN's protocol), over the tasks: trial k ran with memory from 1..k-1."""

    trial: int
    episodes: int
    success: Estimate
    """0-1."""
    score: Estimate
    """0-100."""
    steps: float
    memories: float
    """Mean number of knowledge items the memory held at this trial."""
    task_scores: dict[str, float] = Field(default_factory=dict)
    """Each task's score 0-100 at this trial: what :attr:`EvalReport.adapt_gain` pairs."""


def adapt_gain(points: Sequence[AdaptPoint]) -> Gain | None:
    """An ADAPT curve's first trial to its last, paired over tasks (None without two trials)."""
    if len(points) < 2:
        return None
    return paired_gain(points[0].task_scores, points[-1].task_scores)


def adapt_gain_line(points: Sequence[AdaptPoint]) -> str:
    """:func:`adapt_gain` as one sentence ("" without two trials): the report, the console and
    ``bench/keep.py table`` print this."""
    g = adapt_gain(points)
    if g is None:
        return ""
    return f"trial {points[0].trial} to trial {points[-1].trial}, paired over tasks: {g.fmt()}"


class EvalReport(BaseModel):
    title: str
    env: str
    split: str
    policy: str
    arms: list[ArmMetrics] = Field(default_factory=list)
    comparisons: list[Comparison] = Field(default_factory=list)
    curve: list[CurvePoint] = Field(default_factory=list)
    adapt: list[AdaptPoint] = Field(default_factory=list)
    adapt_title: str = "ADAPT: the same task over trials, memory carried"
    knowledge: dict[str, Any] = Field(default_factory=dict)
    """``counts`` ({skills|guardrails: {status: n}}) is shown as a table; the rest as JSON."""
    caption: str = ""
    notes: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def adapt_gain(self) -> Gain | None:
        """The first trial to the last, paired over tasks (None without two trials)."""
        return adapt_gain(self.adapt)

    def adapt_gain_line(self) -> str:
        """The gain as one sentence for the report and the console ("" without two trials)."""
        return adapt_gain_line(self.adapt)

    def table_md(self) -> str:
        rows = [
            "| arm | episodes | success % [95% CI] | goal success % | score (0-100) | steps | steps (won) | "
            "tokens/step (in/out) | latency p50 s | errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in self.arms:
            won = "-" if m.steps_success_mean is None else f"{m.steps_success_mean:.1f}"
            rows.append(
                f"| {m.arm} | {m.episodes} | {m.success.fmt(100)} | {m.goal_success.mean * 100:.1f} | "
                f"{m.score.fmt()} | {m.steps_mean:.1f} | {won} | {m.prompt_tokens_per_step:.0f}/"
                f"{m.completion_tokens_per_step:.0f} | {m.latency_p50_s:.3f} | {m.errors} |"
            )
        return "\n".join(rows)


# ----------------------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    _plt().close(fig)
    return p


def bars_with_ci(values: Mapping[str, Interval], path: str | Path, title: str, ylabel: str) -> Path:
    """One bar per arm with its 95% CI as an error bar."""
    plt = _plt()
    names = list(values)
    means = [values[n][0] for n in names]
    err = [[values[n][0] - values[n][1] for n in names], [values[n][2] - values[n][0] for n in names]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    ax.bar(
        names, means, yerr=err, capsize=6, color=["#999999", "#6b8fb3", "#4d9a4d", "#d9822b"][: len(names)]
    )
    for i, n in enumerate(names):
        # Beside the bar, above its CI, so the label never sits on the error bar.
        ax.text(i + 0.08, values[n][2] + 1.5, f"{values[n][0]:.1f}", ha="left", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(100.0, max((values[n][2] for n in names), default=0) + 8))
    fig.tight_layout()
    return _save(fig, path)


def curves(
    series: Mapping[str, Sequence[tuple[float, float, float, float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Labelled lines, each with its CI band over ``(x, mean, lo, hi)`` points, plus reference lines."""
    plt = _plt()
    colors = ["#4d9a4d", "#d9822b", "#6b8fb3", "#999999"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (name, points) in enumerate(series.items()):
        pts = sorted(points)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        c = colors[i % len(colors)]
        ax.plot(xs, [p[1] for p in pts], marker="o", color=c, label=name)
        ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=c, alpha=0.2)
        if len(xs) <= 12:
            ax.set_xticks(xs)  # few points (trials, episode counts): label each one
    styles = ["--", ":", "-."]
    for i, (name, y) in enumerate((references or {}).items()):
        ax.axhline(y, linestyle=styles[i % len(styles)], color="#666666", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def grouped_counts(counts: Mapping[str, Mapping[str, int]], path: str | Path, title: str) -> Path:
    """Horizontal grouped bars: one group per category (failure cause), one bar per arm."""
    plt = _plt()
    arms = list(counts)
    cats = sorted({c for a in arms for c in counts[a]}, key=lambda c: -sum(counts[a].get(c, 0) for a in arms))
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * max(len(cats), 1) * max(len(arms), 1) + 1.5))
    h = 0.8 / max(len(arms), 1)
    for i, a in enumerate(arms):
        ys = [k + i * h for k in range(len(cats))]
        ax.barh(ys, [counts[a].get(c, 0) for c in cats], height=h, label=a)
    ax.set_yticks([k + h * (len(arms) - 1) / 2 for k in range(len(cats))])
    ax.set_yticklabels(cats)
    ax.invert_yaxis()
    ax.set_xlabel("episodes")
    ax.set_title(title, fontsize=10)
    if arms:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------- files


def _pct(e: Estimate, scale: float = 100.0) -> str:
    return e.fmt(scale)


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and the plots of what the report holds; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": out / "metrics.json", "report": out / "report.md"}
    files["metrics"].write_text(report.model_dump_json(indent=2))
    n = report.arms[0].episodes if report.arms else 0
    setup = f"{report.policy}, {n} episodes per arm"
    if report.arms:
        files["success"] = bars_with_ci(
            {m.arm: (100 * m.success.mean, 100 * m.success.lo, 100 * m.success.hi) for m in report.arms},
            out / "success_by_arm.png",
            f"{report.env} {report.split} success ({setup})",
            "success rate, % (95% bootstrap CI)",
        )
        files["score"] = bars_with_ci(
            {m.arm: (m.score.mean, m.score.lo, m.score.hi) for m in report.arms},
            out / "score_by_arm.png",
            f"{report.env} {report.split} score ({setup})",
            "score 0-100 (95% bootstrap CI)",
        )
        files["causes"] = grouped_counts(
            {m.arm: m.failure_causes for m in report.arms},
            out / "failure_causes.png",
            "failure causes of failed episodes (diagnosis taxonomy)",
        )
    if report.curve:
        refs = {f"{m.arm}": 100 * m.success.mean for m in report.arms if m.arm != "evolve"}
        files["curve"] = curves(
            {
                "evolve (skills + guardrails)": [
                    (p.train_episodes, 100 * p.success, 100 * p.lo, 100 * p.hi) for p in report.curve
                ]
            },
            out / "learning_curve.png",
            "success as knowledge accumulates",
            "train episodes distilled into knowledge",
            f"{report.split} success rate, %",
            refs,
        )
    if report.adapt:
        files["adapt"] = curves(
            {
                "score 0-100": [(p.trial, p.score.mean, p.score.lo, p.score.hi) for p in report.adapt],
                "success %": [
                    (p.trial, 100 * p.success.mean, 100 * p.success.lo, 100 * p.success.hi)
                    for p in report.adapt
                ],
            },
            out / "adapt.png",
            f"{report.adapt_title} ({report.adapt[0].episodes} tasks)",
            "trial",
            "% (95% CI over tasks)",
        )
    files["report"].write_text(_markdown(report, files))
    return files


def _markdown(report: EvalReport, files: Mapping[str, Path]) -> str:
    md = [
        f"# {report.title}",
        "",
        f"Env `{report.env}`, split `{report.split}`, policy `{report.policy}`.",
        "",
    ]
    if report.caption:
        md += [report.caption, ""]
    if report.arms:
        md += [report.table_md(), ""]
    if report.comparisons:
        md += ["Paired comparisons (same tasks and seeds; difference in points, 95% bootstrap CI):", ""]
        md += ["| a vs b | paired episodes | success delta | score delta |", "|---|---|---|---|"]
        for c in report.comparisons:
            md.append(
                f"| {c.a} vs {c.b} | {c.paired_episodes} | {c.success_delta.fmt(100)} | {c.score_delta.fmt()} |"
            )
        md.append("")
    if "success" in files:
        md += ["![success by arm](success_by_arm.png)", ""]
    if report.curve:
        md += [
            "## Learning curve",
            "",
            "| train episodes | won | skills | guardrails | episodes | success % [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for p in report.curve:
            md.append(
                f"| {p.train_episodes} | {p.train_successes} | {p.skills} | {p.guardrails} | {p.episodes} | "
                f"{100 * p.success:.1f} [{100 * p.lo:.1f}, {100 * p.hi:.1f}] |"
            )
        md += ["", "![learning curve](learning_curve.png)", ""]
    if report.adapt:
        md += [
            f"## {report.adapt_title}",
            "",
            "| trial | tasks | success % [95% CI] | score 0-100 [95% CI] | steps | memories |",
            "|---|---|---|---|---|---|",
        ]
        for a in report.adapt:
            md.append(
                f"| {a.trial} | {a.episodes} | {_pct(a.success)} | {a.score.fmt()} | {a.steps:.1f} | "
                f"{a.memories:.1f} |"
            )
        if line := report.adapt_gain_line():
            md += ["", line[0].upper() + line[1:] + "."]
        md += ["", "![ADAPT curve](adapt.png)", ""]
    if report.arms:
        md += [
            "## Failure causes",
            "",
            "| cause | " + " | ".join(m.arm for m in report.arms) + " |",
            "|---|" + "---|" * len(report.arms),
        ]
        for c in _causes(report):
            md.append(f"| {c} | " + " | ".join(str(m.failure_causes.get(c, 0)) for m in report.arms) + " |")
        md += ["", "![failure causes](failure_causes.png)", ""]
    if report.knowledge:
        md += ["## Knowledge", "", "```json", json.dumps(report.knowledge, indent=2, default=str), "```", ""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(md)


def _causes(report: EvalReport) -> list[str]:
    causes = {c for m in report.arms for c in m.failure_causes}
    return sorted(causes, key=lambda c: (-sum(m.failure_causes.get(c, 0) for m in report.arms), c))


# ----------------------------------------------------------------------------------- console


def print_report(report: EvalReport, console: Console, *, detailed: bool = False) -> None:
    """The arms table; with ``detailed``, also the paired differences, knowledge counts, failure
    causes, learning curve and ADAPT tables (what ``bench/evolution.py`` prints)."""
    if report.arms and not detailed:
        t = Table(title=f"{report.env} {report.split} — {report.policy}")
        for c in ("arm", "episodes", "success % [95% CI]", "score", "steps", "top failure causes"):
            t.add_column(c)
        for m in report.arms:
            top = ", ".join(f"{k} {v}" for k, v in list(m.failure_causes.items())[:3])
            t.add_row(
                m.arm, str(m.episodes), m.success.fmt(100), f"{m.score.mean:.1f}", f"{m.steps_mean:.1f}", top
            )
        console.print(t)
    if not detailed:
        return
    if report.arms:
        _table(
            console,
            "Held-out results per arm",
            [
                "arm",
                "episodes",
                "success % [95% CI]",
                "score 0-100 [95% CI]",
                "steps",
                "steps (won)",
                "tokens/action (prompt+gen)",
                "s/action p50",
                "errors",
            ],
            [
                [
                    m.arm,
                    str(m.episodes),
                    _pct(m.success),
                    m.score.fmt(),
                    f"{m.steps_mean:.1f}",
                    "-" if m.steps_success_mean is None else f"{m.steps_success_mean:.1f}",
                    f"{m.prompt_tokens_per_step:.0f}+{m.completion_tokens_per_step:.0f}",
                    f"{m.latency_p50_s:.2f}",
                    str(m.errors),
                ]
                for m in report.arms
            ],
            report.caption,
        )
    if report.comparisons:
        _table(
            console,
            "Paired differences (same task, same seed)",
            ["comparison", "pairs", "success pts [95% CI]", "score pts [95% CI]"],
            [
                [f"{c.a} - {c.b}", str(c.paired_episodes), _pct(c.success_delta), c.score_delta.fmt()]
                for c in report.comparisons
            ],
        )
    counts = report.knowledge.get("counts") or {}
    if counts:
        _table(
            console,
            "Knowledge",
            ["kind", "candidate", "active", "retired"],
            [[k, *(str(c.get(s, 0)) for s in ("candidate", "active", "retired"))] for k, c in counts.items()],
        )
    causes = _causes(report)
    if causes:
        _table(
            console,
            "Failure causes per arm (episode diagnoses)",
            ["failure cause (failed episodes)", *(m.arm for m in report.arms)],
            [[c, *(str(m.failure_causes.get(c, 0)) for m in report.arms)] for c in causes],
        )
    if report.curve:
        _table(
            console,
            "Success as knowledge accumulates",
            ["train episodes", "won", "skills", "guardrails", "episodes", "success % [95% CI]"],
            [
                [
                    str(p.train_episodes),
                    str(p.train_successes),
                    str(p.skills),
                    str(p.guardrails),
                    str(p.episodes),
                    f"{100 * p.success:.1f} [{100 * p.lo:.1f}, {100 * p.hi:.1f}]",
                ]
                for p in report.curve
            ],
        )
    if report.adapt:
        _table(
            console,
            report.adapt_title,
            ["trial", "tasks", "success % [95% CI]", "score 0-100 [95% CI]", "steps", "memories"],
            [
                [
                    str(a.trial),
                    str(a.episodes),
                    _pct(a.success),
                    a.score.fmt(),
                    f"{a.steps:.1f}",
                    f"{a.memories:.1f}",
                ]
                for a in report.adapt
            ],
            caption=report.adapt_gain_line(),
        )


def _table(
    console: Console, title: str, cols: Sequence[str], rows: Sequence[Sequence[str]], caption: str = ""
) -> None:
    t = Table(title=title, caption=caption or None)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    console.print(t)
