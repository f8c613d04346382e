"""`evolve run` end to end on a small TextWorld job, including a real kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evolve.config import parse_job
from evolve.errors import ConfigError
from evolve.pipeline import run_job
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


def _check_store(path: Path) -> dict[str, int]:
    with ExperienceStore(path, namespace="tiny", read_only=True) as st:
        dup = st.conn.execute(
            "SELECT count(*) FROM (SELECT arm, task_id, seed, count(*) c FROM trajectories "
            "GROUP BY ALL HAVING c > 1)"
        ).fetchall()[0][0]
        bad = st.conn.execute(
            "SELECT count(*) FROM trajectories t WHERE n_steps <> "
            "(SELECT count(*) FROM steps s WHERE s.trajectory_id = t.id)"
        ).fetchall()[0][0]
        arms = dict(st.conn.execute("SELECT arm, count(*) FROM trajectories GROUP BY arm").fetchall())
        stages = st.stages("tiny")
    assert dup == 0, "an episode was recorded twice"
    assert bad == 0, "a trajectory lost steps"
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

    # A second run skips every finished stage and records nothing new.
    run_job(cfg)
    assert _check_store(cfg.store_path) == arms

    # Only eval, on request: reruns the stage, reuses the recorded episodes.
    run_job(cfg, stages=["eval"])
    assert _check_store(cfg.store_path) == arms
    with pytest.raises(ConfigError, match="not available yet"):
        run_job(parse_job({**_job(tmp_path), "stages": {"train": {}}}))


def test_kill_9_mid_run_then_resume(tmp_path: Path) -> None:
    job = _job(tmp_path, eval={"learning_curve": []})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    log = tmp_path / "run" / "run.log"
    cmd = [sys.executable, "-m", "evolve.cli", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Kill once in the middle of collecting and once in the middle of the eval stage.
    for marker, delay in (("stage collect start", 4.0), ("stage eval start", 3.0)):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and marker in log.read_text():
                break
            time.sleep(0.2)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers die too
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    arms = _check_store(tmp_path / "run" / "store.duckdb")
    assert arms["collect:teacher"] == 4 and arms["collect:student"] == 4
    assert arms["eval:no_memory"] == arms["eval:evolve"] == arms["eval:raw_retrieval"] == 3
    assert (tmp_path / "run" / "report.md").exists()
