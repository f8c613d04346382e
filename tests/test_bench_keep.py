"""bench/keep.py: a benchmark kept in git resumes on a fresh machine without redoing anything.

A real (small) bench/evolution.py run on TextWorld with ``--keep``; then the same command with a new,
empty OUT (what a fresh machine has) and the same kept directory must restore every episode, the
knowledge with its status and usage, and the stages, run no episode again, and report the same.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evolution  # noqa: E402
import keep  # noqa: E402

from evolve.stores import ExperienceStore  # noqa: E402


def _argv(out: Path, kept: Path) -> list[str]:
    return [
        *("--out", str(out), "--keep", str(kept), "--n-train", "3", "--n-dev", "1", "--n-test", "2"),
        *("--oracle-demos", "2", "--knowledge", "own+oracle", "--trials", "1", "--max-steps", "8"),
        *("--workers", "1", "--curve", "", "--adapt-tasks", "1", "--adapt-trials", "2", "--quiet"),
    ]


def _snapshot(out: Path, ns: str) -> dict[str, object]:
    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        know = [*store.skills(ns), *store.guardrails(ns)]
        return {
            "episodes": sorted((t.id, t.run_id, t.created_at, len(t.steps)) for t in store.trajectories(ns)),
            "knowledge": sorted((k.id, k.status.value, k.stats.uses, k.stats.successes) for k in know),
            "stages": {k: v["status"] for k, v in store.stages(ns).items()},
            "usage": {k: (v["status"], v["data"]) for k, v in store.stages(f"usage:{ns}").items()},
        }


def test_a_kept_run_resumes_on_an_empty_out_dir(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    evolution.main(_argv(tmp_path / "first", kept))
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    ns = first["namespace"]
    before = _snapshot(tmp_path / "first", ns)
    assert before["episodes"] and before["knowledge"]
    stages = before["stages"]
    assert stages == {"distill": "done", "probation": "done"}
    assert before["usage"]["eval:evolve"][1]["trajectories"]  # type: ignore[index]
    files = sorted(p.name for p in (kept / "episodes").iterdir())
    assert any(f.startswith("adapt_") for f in files) and any(f.startswith("probation_") for f in files)
    run_ids = {r for _, r, _, _ in before["episodes"]}  # type: ignore[union-attr]
    assert len(files) == len(run_ids)

    # A fresh machine: a new OUT, the kept directory only. Nothing runs again (same ids, same
    # creation times), the knowledge keeps its probation status and usage, the report is the same.
    evolution.main(_argv(tmp_path / "second", kept))
    assert _snapshot(tmp_path / "second", ns) == before
    second = json.loads((tmp_path / "second" / "results.json").read_text())
    assert second["arms"] == first["arms"] and second["adapt"] == first["adapt"]

    # Saving an unchanged store changes no file (no churn in git); a new episode changes its run's file.
    with ExperienceStore(tmp_path / "second" / "store.duckdb", namespace=ns, embedder="hash") as store:
        assert keep.save(store, ns, kept) == 0
        t = store.trajectories(ns, run_id="eval:no_memory")[0]
        store.add_trajectories([t.model_copy(update={"id": t.id + "-again"})])
        assert keep.save(store, ns, kept) == 1
    lines = gzip.decompress(keep.run_file(kept, "eval:no_memory").read_bytes()).decode().splitlines()
    assert len(lines) == 1 + sum(1 for _, r, _, _ in before["episodes"] if r == "eval:no_memory")  # type: ignore[union-attr]


def test_keep_cli_names_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no store at"):
        keep.main(["save", str(tmp_path / "nope.duckdb"), "ns", str(tmp_path / "kept")])
