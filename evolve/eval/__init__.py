"""Evaluation: metrics with bootstrap CIs, the harness (arms, learning curve, ADAPT, probation
runner, usage write-back) and reports with plots. Memory arrives from the recipe as a
:class:`Memory`; nothing here imports ``evolve.skills`` or the pipeline."""

from evolve.eval.adapt import adapt, adapt_points
from evolve.eval.harness import (
    ARMS,
    COMPARISONS,
    CONTEXT_ARMS,
    Episodes,
    Memory,
    ProbationRunner,
    arm_hooks,
    compare_arms,
    knowledge_counts,
    learning_curve,
    record_usage,
    run_arms,
    task_ids,
)
from evolve.eval.metrics import (
    ArmMetrics,
    Comparison,
    Estimate,
    Gain,
    arm_metrics,
    bootstrap,
    compare,
    paired_gain,
    task_score,
)
from evolve.eval.report import AdaptPoint, CurvePoint, EvalReport, print_report, write_report

__all__ = [
    "ARMS",
    "COMPARISONS",
    "CONTEXT_ARMS",
    "AdaptPoint",
    "ArmMetrics",
    "Comparison",
    "CurvePoint",
    "Episodes",
    "Estimate",
    "EvalReport",
    "Gain",
    "Memory",
    "ProbationRunner",
    "adapt",
    "adapt_points",
    "arm_hooks",
    "arm_metrics",
    "bootstrap",
    "compare",
    "compare_arms",
    "knowledge_counts",
    "learning_curve",
    "paired_gain",
    "print_report",
    "record_usage",
    "run_arms",
    "task_ids",
    "task_score",
    "write_report",
]
