"""bench/evolution.py end to end on real TextWorld games with the random policy (small sizes).

The ADAPT stage (CLIN's protocol: the same task over several trials, memory distilled after each
trial) must carry memory forward: trial k runs with knowledge from that task's earlier trials only.
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


def _args(out: Path, *extra: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--n-train",
        "3",
        "--n-dev",
        "1",
        "--n-test",
        "2",
        "--oracle-demos",
        "3",
        "--knowledge",
        "oracle",
        "--trials",
        "1",
        "--max-steps",
        "8",
        "--workers",
        "1",
        "--curve",
        "",
        "--no-probation",
        "--quiet",
        *extra,
    ]


def test_adapt_curve_carries_memory_between_trials(tmp_path: Path) -> None:
    out, kept = tmp_path / "evo", tmp_path / "kept"
    evolution.main(
        _args(out, "--skip-arms", "--adapt-tasks", "2", "--adapt-trials", "3", "--keep", str(kept))
    )
    res = json.loads((out / "results.json").read_text())
    assert res["arms"] == {}
    pts = res["adapt"]
    assert [p["trial"] for p in pts] == [1, 2, 3]
    assert all(p["episodes"] == 2 for p in pts)
    assert all(0.0 <= p["score"] <= 100.0 and p["score_lo"] <= p["score"] <= p["score_hi"] for p in pts)
    gain = res["adapt_gain"]
    assert gain["tasks"] == 2 and gain["delta"]["mean"] == pytest.approx(
        sum(pts[2]["task_scores"].values()) / 2 - sum(pts[0]["task_scores"].values()) / 2
    )
    # The kept trials alone give the same curve, task by task (while a run holds the store).
    table = keep.adapt_table(kept)
    assert all(f"{p['score']:.1f} [{p['score_lo']:.1f}, {p['score_hi']:.1f}] (2)" in table for p in pts)
    assert all(f"| {task} | " in table for task in pts[0]["task_scores"])
    assert "trial 1 to trial 3, paired over tasks: " in table
    assert (out / "adapt.png").stat().st_size > 0
    assert "ADAPT" in (out / "report.md").read_text()

    # Each trial is its own run id; memory at trial k comes from the task's trials 1..k-1 only, so
    # trial 1 ran without memory (nothing retrieved) and later trials had memories to retrieve from.
    assert pts[0]["memories"] == 0
    assert all(p["memories"] > 0 for p in pts[1:])

    ns = res["namespace"]
    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        by_trial = {k: store.trajectories(ns, run_id=f"adapt:empty:{k}") for k in (1, 2, 3)}
        assert all(len(v) == 2 for v in by_trial.values())
        assert not any(s.retrieved for t in by_trial[1] for s in t.steps)
        n_before = len(store.trajectories(ns))

    # A rerun resumes: nothing is collected twice.
    evolution.main(_args(out, "--skip-arms", "--adapt-tasks", "2", "--adapt-trials", "3"))
    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        assert len(store.trajectories(ns)) == n_before


def test_arms_curve_and_usage_write_back(tmp_path: Path) -> None:
    out = tmp_path / "arms"
    argv = [a for a in _args(out, "--curve", "0,all", "--curve-tasks", "1") if a != "--no-probation"]
    # (the later --curve wins over the default "" of _args)
    evolution.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == ["no_memory", "raw_retrieval", "evolve"]
    assert all(m["episodes"] == 2 for m in res["arms"].values())
    assert set(res["comparisons"]) == {"no_memory", "raw_retrieval"}
    assert [p["train_episodes"] for p in res["curve"]] == [0, 3]
    assert "probation" in res["knowledge"] and "counts" in res["knowledge"]
    for f in (
        "report.md",
        "success_by_arm.png",
        "score_by_arm.png",
        "failure_causes.png",
        "learning_curve.png",
    ):
        assert (out / f).stat().st_size > 0, f

    def uses(store: ExperienceStore) -> dict[str, int]:
        return {
            k.id: k.stats.uses for k in [*store.skills(res["namespace"]), *store.guardrails(res["namespace"])]
        }

    with ExperienceStore(out / "store.duckdb", namespace=res["namespace"], embedder="hash") as store:
        before = uses(store)
        used = {
            k
            for t in store.trajectories(run_id="eval:evolve")
            for k in (t.metadata.get("evolve") or {}).get("used", {})
        }
    # Every item the evolve arm used has its uses written back.
    assert used and all(before.get(k, 0) > 0 for k in used if k in before)
    evolution.main(argv)  # a rerun resumes and counts nothing twice
    with ExperienceStore(out / "store.duckdb", namespace=res["namespace"], embedder="hash") as store:
        assert uses(store) == before


def test_redo_knowledge_reruns_only_what_used_the_knowledge(tmp_path: Path) -> None:
    """After a change to the memory code, ``--redo-knowledge TAG`` reruns probation and the evolve
    arm from the same candidates, keeps the no-memory and raw episodes, and is done once per tag."""
    out, kept = tmp_path / "redo", tmp_path / "kept"
    argv = _args(out, "--arms", "no_memory,raw_retrieval,evolve", "--keep", str(kept))
    argv.remove("--no-probation")
    evolution.main(argv)
    ns = json.loads((out / "results.json").read_text())["namespace"]

    def ids(store: ExperienceStore) -> dict[str, set[str]]:
        by: dict[str, set[str]] = {}
        for t in store.trajectories(ns):
            by.setdefault(t.run_id or "", set()).add(t.id)
        return by

    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        first = ids(store)
        n_items = len(store.skills(ns)) + len(store.guardrails(ns))
    assert any(r.startswith("probation:") for r in first) and "eval:evolve" in first

    evolution.main([*argv, "--redo-knowledge", "t1"])
    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        second = ids(store)
        assert store.stages(ns)["redo:t1"]["status"] == "done"
        assert store.stages(ns)["probation"]["status"] == "done"  # probation ran again
        assert len(store.skills(ns)) + len(store.guardrails(ns)) == n_items  # the same candidates
    assert set(second) == set(first)
    for run in ("train:own", "train:oracle", "eval:no_memory", "eval:raw_retrieval"):
        if run in first:
            assert second[run] == first[run], run  # kept, not rerun
    baseline = [r for r in first if r.startswith("probation:") and not evolution.used_knowledge(r)]
    assert len(baseline) == 1 and second[baseline[0]] == first[baseline[0]]  # no knowledge: kept
    for run in [r for r in first if r == "eval:evolve" or r.startswith("probation:")]:
        if run not in baseline:
            assert second[run].isdisjoint(first[run]), run  # rerun: new episodes
    # The kept directory matches the store again: the dropped episodes were replaced there.
    kept_evolve = (kept / "episodes" / "eval_evolve.jsonl.gz").read_bytes()
    assert {json.loads(x)["id"] for x in gzip.decompress(kept_evolve).splitlines()} == second["eval:evolve"]

    evolution.main([*argv, "--redo-knowledge", "t1"])  # the same tag again: a resume, nothing dropped
    with ExperienceStore(out / "store.duckdb", namespace=ns, embedder="hash") as store:
        assert ids(store) == second
    # The kept directory alone gives the report's numbers (while a run holds the store).
    table = keep.arm_table(kept)
    res = json.loads((out / "results.json").read_text())
    for arm in ("no_memory", "raw_retrieval"):
        d = res["comparisons"][arm]["score_delta"]
        assert f"- evolve - {arm}: {d['mean']:+.1f} [{d['lo']:.1f}, {d['hi']:.1f}]" in table
    for arm, m in res["arms"].items():
        assert f"| {arm} | {m['episodes']} | " in table
