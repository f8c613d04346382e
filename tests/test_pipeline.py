"""`evolve run` end to end on a small TextWorld job, including a real kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from evolve.config import parse_job
from evolve.envs.textworld_env import TextWorldEnv
from evolve.errors import ConfigError
from evolve.pipeline import adapt_job, run_job
from evolve.schema import Task
from evolve.stores import ExperienceStore

pytestmark = pytest.mark.slow


def _job(tmp: Path, **stage_over: dict) -> dict:
    job = {
        "name": "tiny",
        "run_dir": str(tmp / "run"),
        "env": {"name": "textworld", "kwargs": {"n_train": 4, "n_dev": 2, "n_test": 3}},
        "policies": {"teacher": {"kind": "oracle"}, "student": {"kind": "random", "seed": 0}},
        "store": {"namespace": "tiny", "embedder": "hash"},
        "stages": {
            "collect": {"policy": "teacher", "also": ["student"], "max_steps": 25},
            "diagnose": {},
            "distill": {"probation": {"split": "dev"}},
            "synth": {"kinds": ["sft", "privileged"]},
            "eval": {
                "policy": "student",
                "split": "test",
                "arms": ["no_memory", "raw_retrieval", "evolve"],
                "max_steps": 25,
                "learning_curve": [2, 4],
                "bootstrap": 200,
            },
        },
    }
    for k, v in stage_over.items():
        job["stages"][k].update(v)
    return job


def _check_store(path: Path, run_id: str = "tiny") -> dict[str, int]:
    with ExperienceStore(path, namespace="tiny", read_only=True) as st:
        dup = st.conn.execute(
            "SELECT count(*) FROM (SELECT arm, task_id, seed, count(*) c FROM trajectories "
            "GROUP BY ALL HAVING c > 1)"
        ).fetchall()[0][0]
        bad = st.conn.execute(
            "SELECT count(*) FROM trajectories t WHERE n_steps <> "
            "(SELECT count(*) FROM steps s WHERE s.trajectory_id = t.id)"
        ).fetchall()[0][0]
        orphans = st.conn.execute(
            "SELECT count(*) FROM steps s WHERE s.trajectory_id NOT IN (SELECT id FROM trajectories)"
        ).fetchall()[0][0]
        arms = dict(st.conn.execute("SELECT arm, count(*) FROM trajectories GROUP BY arm").fetchall())
        stages = st.stages(run_id)
    assert dup == 0, "an episode was recorded twice"
    assert bad == 0, "a trajectory lost steps"
    assert orphans == 0, "steps of an unrecorded episode"
    assert all(v["status"] == "done" for v in stages.values()), stages
    return arms


def test_run_writes_report_and_resumes_without_duplicates(tmp_path: Path) -> None:
    cfg = parse_job(_job(tmp_path))
    result = run_job(cfg)
    run = tmp_path / "run"
    for f in ("report.md", "metrics.json", "success_by_arm.png", "failure_causes.png", "learning_curve.png"):
        assert (run / f).exists(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert [a["arm"] for a in metrics["arms"]] == ["no_memory", "raw_retrieval", "evolve"]
    assert all(a["episodes"] == 3 for a in metrics["arms"])
    assert "evolve vs no_memory" in (run / "report.md").read_text()
    arms = _check_store(cfg.store_path)
    assert arms["collect:teacher"] == 4 and arms["eval:evolve"] == 3
    assert result["stages"]["collect"]["teacher"]["success"] == 4  # the oracle wins every train game

    # The memory loop is closed: what probation and eval used is written back, as new versions.
    with ExperienceStore(cfg.store_path, namespace="tiny", read_only=True) as st:
        items = [*st.skills(), *st.guardrails()]
        used = [k for k in items if k.stats.uses > 0]
        assert used, "no knowledge item had its uses written back"
        assert all(k.stats.successes + k.stats.failures == k.stats.uses for k in used)
        assert any(len(st.knowledge_versions(k.id)) > 1 for k in used)
        uses = {k.id: k.stats.uses for k in items}
        # Retrieval logs carry the query and each candidate's rank and similarity (reranker data).
        logs = st.retrieval_logs()
        assert logs and all(r.query for r in logs)
        assert any(r.rank is not None and r.similarity is not None for r in logs)
    assert result["stages"]["eval"]["usage_written"] > 0

    # A second run skips every finished stage and records nothing new.
    run_job(cfg)
    assert _check_store(cfg.store_path) == arms

    # Only eval, on request: reruns the stage, reuses the recorded episodes, counts no use twice.
    run_job(cfg, stages=["eval"])
    assert _check_store(cfg.store_path) == arms
    with ExperienceStore(cfg.store_path, namespace="tiny", read_only=True) as st:
        assert {k.id: k.stats.uses for k in [*st.skills(), *st.guardrails()]} == uses

    # ADAPT on the job (what `evolve eval --adapt 2 --trials 2` runs): trial 1 without memory.
    res = adapt_job(cfg, tasks=2, trials=2)
    assert [p["trial"] for p in res["adapt"]] == [1, 2]
    assert res["adapt"][0]["memories"] == 0 and all(p["episodes"] == 2 for p in res["adapt"])
    assert (run / "adapt" / "adapt.png").stat().st_size > 0
    arms = _check_store(cfg.store_path)
    assert arms["adapt:empty:1"] == arms["adapt:empty:2"] == 2
    # A train stage needs a model to train (the random student has none): one line, before any work.
    with pytest.raises(ConfigError, match="stages.train.student is missing"):
        run_job(parse_job({**_job(tmp_path), "stages": {"train": {}}}))


class GatedTextWorld(TextWorldEnv):
    """TextWorld for the kill test: while the file ``<gate>/<split>`` exists, the second episode
    started on that split in this process stops before its first step (after touching
    ``<gate>/<split>.held``) and waits to be killed. The run is then provably inside a stage, with
    one episode of it recorded and one in flight."""

    started: ClassVar[Counter[str]] = Counter()

    def __init__(self, gate: str = "", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.gate = Path(gate) if gate else None

    def reset(self, task: Task | str):  # noqa: ANN201
        obs = super().reset(task)
        if self.gate is not None:
            split = self._split_for(task.id if isinstance(task, Task) else task).value
            GatedTextWorld.started[split] += 1
            if (self.gate / split).exists() and GatedTextWorld.started[split] >= 2:
                (self.gate / f"{split}.held").touch()
                while True:
                    time.sleep(1)
        return obs


def _kill_when_held(cmd: list[str], env: dict[str, str], gate: Path, split: str, log: Path) -> None:
    (gate / split).touch()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        deadline = time.time() + 300
        while not (gate / f"{split}.held").exists():
            assert proc.poll() is None, f"the run ended before the gate: {log.read_text()[-2000:]}"
            assert time.time() < deadline, "the run never reached the gate"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers die too
        proc.wait()
    (gate / split).unlink()


def test_kill_9_mid_stage_then_resume(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    job = _job(tmp_path, eval={"learning_curve": []})
    job["env"] = {
        "name": "test_pipeline:GatedTextWorld",
        "kwargs": {**job["env"]["kwargs"], "gate": str(gate)},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    store = tmp_path / "run" / "store.duckdb"
    cmd = [sys.executable, "-m", "evolve.cli", "run", str(path)]
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }

    # 1. Killed inside collect: the teacher's first episode is stored, its second was in flight.
    _kill_when_held(cmd, env, gate, "train", tmp_path / "err1.txt")
    with ExperienceStore(store, namespace="tiny", read_only=True) as st:
        assert st.stages("tiny")["collect"]["status"] == "running"
        assert [t.arm for t in st.trajectories()] == ["collect:teacher"]

    # 2. Resumed, then killed inside eval: the stages before it are done, one eval episode stored.
    _kill_when_held(cmd, env, gate, "test", tmp_path / "err2.txt")
    with ExperienceStore(store, namespace="tiny", read_only=True) as st:
        stages = st.stages("tiny")
        assert {k: v["status"] for k, v in stages.items()} == {
            "collect": "done",
            "diagnose": "done",
            "distill": "done",
            "synth": "done",
            "eval": "running",
        }
        assert [t.arm for t in st.trajectories() if t.arm.startswith("eval:")] == ["eval:no_memory"]

    # 3. Resumed to the end: every episode once, no orphan steps, every stage done.
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    arms = _check_store(store)
    assert arms["collect:teacher"] == 4 and arms["collect:student"] == 4
    assert arms["eval:no_memory"] == arms["eval:evolve"] == arms["eval:raw_retrieval"] == 3
    assert (tmp_path / "run" / "report.md").exists()
