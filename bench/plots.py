"""Small matplotlib (Agg) helpers for the benchmark scripts: bars with CIs, curves, cause counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Interval = tuple[float, float, float]
"""(mean, lo, hi)"""


def bars_with_ci(values: Mapping[str, Interval], path: str | Path, title: str, ylabel: str) -> Path:
    """One bar per arm with its 95% CI as an error bar."""
    names = list(values)
    means = [values[n][0] for n in names]
    err = [[values[n][0] - values[n][1] for n in names], [values[n][2] - values[n][0] for n in names]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    ax.bar(
        names, means, yerr=err, capsize=6, color=["#999999", "#6b8fb3", "#d9822b", "#4d9a4d"][: len(names)]
    )
    for i, n in enumerate(names):
        # Beside the bar, above its CI, so the label never sits on the error bar.
        ax.text(i + 0.08, values[n][2] + 1.5, f"{values[n][0]:.1f}", ha="left", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(100.0, max((values[n][2] for n in names), default=0) + 8))
    fig.tight_layout()
    return _save(fig, path)


def curve(
    points: Sequence[tuple[float, float, float, float]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    references: Mapping[str, float] | None = None,
) -> Path:
    """A line with a CI band over ``(x, mean, lo, hi)`` points, plus horizontal reference lines."""
    return curves({"evolve": points}, path, title, xlabel, ylabel, references)


def curves(
    series: Mapping[str, Sequence[tuple[float, float, float, float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Labelled lines, each with its CI band over ``(x, mean, lo, hi)`` points, plus reference lines."""
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
