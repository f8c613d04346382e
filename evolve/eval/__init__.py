"""Evaluation: metrics with bootstrap CIs, arm comparisons, the harness, and reports with plots."""

from evolve.eval.metrics import ArmMetrics, Comparison, Estimate, arm_metrics, bootstrap, compare
from evolve.eval.report import CurvePoint, EvalReport, write_report

__all__ = [
    "ArmMetrics",
    "Comparison",
    "CurvePoint",
    "Estimate",
    "EvalReport",
    "arm_metrics",
    "bootstrap",
    "compare",
    "write_report",
]
