"""Job files: the quickstart parses; every mistake gives one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.config import QUICKSTART, load_job, parse_job
from evolve.errors import ConfigError


def test_quickstart_parses() -> None:
    cfg = load_job(None)
    assert cfg.name == "quickstart"
    assert cfg.stages.enabled() == ["collect", "diagnose", "distill", "synth", "train", "eval"]
    assert cfg.store_path == Path("runs/quickstart/store.duckdb")
    assert Path("examples/quickstart.yaml").resolve() == QUICKSTART.resolve()


def _base() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["stages"]["eval"].update(arms=["evolve", "magic"]),
            "stages.eval.arms: unknown arm(s) ['magic']",
        ),
        (lambda d: d["stages"]["collect"].update(policy="teachr"), "'teachr' is not a key of 'policies'"),
        (lambda d: d["stages"]["collect"].update(workerz=2), "stages.collect.workerz: unknown field"),
        (lambda d: d["policies"].update(gpt={"kind": "openai"}), "needs 'model'"),
        (lambda d: d["policies"].update(x={"kind": "telepathy"}), "unknown policy kind 'telepathy'"),
        (lambda d: d["stages"]["collect"].update(split="validation"), "stages.collect.split"),
        (lambda d: d.update(name="bad name!"), "name 'bad name!'"),
    ],
)
def test_bad_fields_are_named(mutate, expected: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as e:
        parse_job(data, "job.yaml")
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_job(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_job(lst)


def test_overrides() -> None:
    cfg = load_job(None, {"stages.eval.episodes": 3, "name": "q2"})
    assert cfg.stages.eval is not None and cfg.stages.eval.episodes == 3
    assert cfg.run_path == Path("runs/q2")


def test_cli_prints_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\npolicies: {a: {kind: random}}\nstages: {collect: {policy: b}}\n")
    r = subprocess.run([sys.executable, "-m", "evolve.cli", "run", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "stages.collect.policy = 'b' is not a key of 'policies'" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "evolve.cli", "store", "stats", "--store", str(tmp_path / "none.duckdb")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "evolve.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "evolve 0.1.0" in r.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "--no-such-option"], "No such option"),
        (["store", "search", "q", "--store", "x.duckdb", "--k", "abc"], "--k"),
        (["run", "{dir}"], "is not a file"),
        (["run", "{binary}"], "not a UTF-8 text file"),
    ],
)
def test_usage_and_unreadable_file_errors_are_one_line(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    """Usage errors (typer's vendored click) and unreadable job files: exit 2, one line, no traceback."""
    (tmp_path / "jobdir").mkdir()
    binary = tmp_path / "job.bin"
    binary.write_bytes(b"\xff\xfe\x00name: x\n\x80\x81")
    argv = [a.format(dir=tmp_path / "jobdir", binary=binary) for a in argv]
    r = subprocess.run(
        [sys.executable, "-m", "evolve.cli", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
