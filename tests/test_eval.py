"""The evaluation harness on its own: import direction, bootstrap CIs, usage write-back, ADAPT,
and `evolve eval --adapt` from the command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from evolve.agents.base import NoHooks
from evolve.cli import app
from evolve.eval import (
    Episodes,
    EvalReport,
    Memory,
    adapt,
    bootstrap,
    compare,
    paired_gain,
    record_usage,
    task_ids,
    write_report,
)
from evolve.schema import Outcome, Skill, Trajectory
from evolve.specs import EnvSpec
from evolve.stores import ExperienceStore

EVAL = Path(__file__).resolve().parents[1] / "evolve" / "eval"
TW = EnvSpec(name="textworld", kwargs={"n_train": 2, "n_dev": 1, "n_test": 2})


def test_eval_imports_neither_skills_nor_the_recipe() -> None:
    for f in EVAL.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not n.startswith(("evolve.skills", "evolve.pipeline", "evolve.cli")), (f.name, n)
    # And importing it loads neither (no cycle through the recipe).
    code = (
        "import sys, evolve.eval; "
        "bad = [m for m in sys.modules if m.startswith('evolve.skills') or m == 'evolve.pipeline']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bootstrap_is_the_percentile_ci_of_the_mean() -> None:
    x = np.array([1.0] * 12 + [0.0] * 28)
    est = bootstrap(x, 4000)
    rng = np.random.default_rng(0)
    means = x[rng.integers(0, x.size, size=(4000, x.size))].mean(axis=1)
    assert est.mean == pytest.approx(0.3)
    assert (est.lo, est.hi) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    assert bootstrap([0.7]).lo == bootstrap([0.7]).hi == 0.7
    assert bootstrap([]).n == 0


def test_paired_gain_pairs_tasks_and_bootstraps_the_ratio_of_means() -> None:
    before = {"a": 40.0, "b": 60.0, "c": 0.0}
    after = {"a": 50.0, "b": 75.0, "c": 10.0, "d": 99.0}  # d has no trial 1: not paired
    g = paired_gain(before, after, n_boot=4000)
    assert g is not None and g.tasks == 3
    assert (g.before, g.after) == pytest.approx((100 / 3, 45.0))
    assert g.delta.mean == pytest.approx(35 / 3)
    assert g.relative is not None and g.relative.mean == pytest.approx(0.35)
    # The relative CI is the ratio of resampled means (same draws as the delta's bootstrap).
    a, b = np.array([40.0, 60.0, 0.0]), np.array([50.0, 75.0, 10.0])
    idx = np.random.default_rng(0).integers(0, 3, size=(4000, 3))
    ma, mb = a[idx].mean(1), b[idx].mean(1)
    r = np.where(ma > 0, (mb - ma) / np.where(ma > 0, ma, 1), np.inf)  # c alone: 0 -> 10
    assert (g.relative.lo, g.relative.hi) == pytest.approx(
        (np.quantile(r, 0.025, method="lower"), np.quantile(r, 0.975, method="higher"))
    )
    assert g.relative.hi == np.inf and "relative +35%" in g.fmt()
    # Nothing scored at the first point: no relative gain, and the reason is said.
    z = paired_gain({"a": 0.0, "b": 0.0}, {"a": 25.0, "b": 0.0})
    assert z is not None and z.relative is None and z.delta.mean == 12.5 and "undefined" in z.fmt()
    assert paired_gain({"a": 1.0}, {"b": 2.0}) is None


def _traj(task: str, seed: int, success: bool, used: dict[str, int] | None = None) -> Trajectory:
    return Trajectory(
        task_id=task,
        env="x",
        seed=seed,
        outcome=Outcome.success if success else Outcome.failure,
        metadata={"evolve": {"used": used or {}}},
    )


def test_compare_is_paired_on_task_and_seed() -> None:
    a = [_traj("t1", 0, True), _traj("t2", 0, True), _traj("t3", 0, False)]
    b = [_traj("t1", 0, False), _traj("t2", 0, True), _traj("t4", 0, False)]
    c = compare("a", a, "b", b, 500)
    assert c.paired_episodes == 2 and c.success_delta.mean == pytest.approx(0.5)


def _usage(trajs):  # what evolve.skills.usage_from_trajectories does, inlined: eval must not need skills
    out: dict[str, list[int]] = {}
    for t in trajs:
        for kid in t.metadata["evolve"]["used"]:
            u = out.setdefault(kid, [0, 0, 0])
            u[0] += 1
            u[1 if t.success else 2] += 1
    return {k: tuple(v) for k, v in out.items()}


def test_record_usage_writes_versions_once(tmp_path: Path) -> None:
    with ExperienceStore(tmp_path / "u.duckdb", namespace="u", embedder="hash") as store:
        skill = Skill(name="open door", steps=["open door"], namespace="u")
        store.upsert_skills([skill])
        memory = Memory(evolve=lambda k: NoHooks, usage=_usage)
        trajs = [_traj("t1", 0, True, {skill.id: 1}), _traj("t2", 0, False, {skill.id: 2})]
        assert record_usage(store, memory, trajs, run_id="r", label="eval") == 1
        st = store.get_knowledge(skill.id).stats
        assert (st.uses, st.successes, st.failures) == (2, 1, 1)
        assert len(store.knowledge_versions(skill.id)) == 2
        # The same episodes again (a rerun, a resumed stage): nothing is counted twice.
        assert record_usage(store, memory, trajs, run_id="r", label="eval") == 0
        store.reset_stages("r")  # what --fresh does leaves the counts' bookkeeping alone
        assert record_usage(store, memory, trajs, run_id="r", label="eval") == 0
        # A new episode counts.
        assert record_usage(
            store, memory, [*trajs, _traj("t3", 1, True, {skill.id: 1})], run_id="r", label="eval"
        )
        assert store.get_knowledge(skill.id).stats.uses == 3


class Remember(NoHooks):
    """Hooks that only say how many memories they hold (metadata), to check what ADAPT passes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_episode_end(self, traj) -> None:
        traj.metadata["memories"] = self.n


class RememberFactory:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> Remember:
        return Remember(self.n)


def test_adapt_distils_only_from_the_tasks_earlier_trials(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def distill(trajs):
        seen.append(sorted({t.task_id for t in trajs}))
        return [Skill(name=f"s{i}", steps=["look"]) for i in range(len(trajs))]

    memory = Memory(evolve=lambda k: RememberFactory(len(k)), distill=distill)
    with ExperienceStore(tmp_path / "a.duckdb", namespace="a", embedder="hash") as store:
        eps = Episodes(store, TW, {"kind": "random", "seed": 0}, max_steps=3, progress=False)
        tasks = task_ids(TW, "test")
        assert len(tasks) == 2
        pts = adapt(eps, memory, tasks, trials=3, seed=0)
        assert [p.trial for p in pts] == [1, 2, 3] and all(p.episodes == 2 for p in pts)
        assert [p.memories for p in pts] == [0, 1, 2]
        assert all(set(p.task_scores) == set(tasks) for p in pts)
        rep = EvalReport(title="t", env="textworld", split="test", policy="random", adapt=pts)
        gain = paired_gain(pts[0].task_scores, pts[-1].task_scores)
        assert gain is not None and rep.adapt_gain == gain
        assert (
            f"Trial 1 to trial 3, paired over tasks: {gain.fmt()}"
            in write_report(rep, tmp_path / "r")["report"].read_text()
        )
        # Each snapshot came from one task's own history only.
        assert all(len(s) == 1 for s in seen)
        by_trial = {k: store.trajectories(run_id=f"adapt:{k}") for k in (1, 2, 3)}
        assert all(t.metadata["memories"] == k - 1 for k, ts in by_trial.items() for t in ts)
        assert all(t.seed == 0 for ts in by_trial.values() for t in ts)
        n = store.count_trajectories()
        adapt(eps, memory, tasks, trials=3, seed=0)  # resumes: nothing new
        assert store.count_trajectories() == n == 6


@pytest.mark.slow
def test_cli_eval_adapt(tmp_path: Path) -> None:
    job = {
        "name": "cli",
        "run_dir": str(tmp_path / "run"),
        "env": {"name": "textworld", "kwargs": {"n_train": 2, "n_dev": 1, "n_test": 2}},
        "policies": {"student": {"kind": "random", "seed": 0}},
        "store": {"namespace": "cli", "embedder": "hash"},
        "stages": {"eval": {"policy": "student", "max_steps": 5, "bootstrap": 100}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = CliRunner().invoke(app, ["eval", str(path), "--adapt", "1", "--trials", "2"])
    assert res.exit_code == 0, res.output
    assert "ADAPT" in res.output and (tmp_path / "run" / "adapt" / "report.md").exists()
    bad = CliRunner().invoke(app, ["eval", str(path), "--adapt", "1", "--adapt-start", "nope"])
    assert bad.exit_code != 0 and "empty" in str(bad.exception)
