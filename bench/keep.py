"""Keep a long benchmark's measurements where git keeps them, so a fresh machine resumes it.

A benchmark's store (``OUT/store.duckdb``) is not committed, and a session may start on a fresh
machine. What a rerun needs to skip the work already done is small: every episode of the
namespace, the knowledge distilled from them (with its probation status and usage stats), and the
stages marked done. :func:`save` writes them under a directory:

* ``episodes/<run id>.jsonl.gz``: one gzipped JSON-lines file per run id (an arm, a probation
  pass, an ADAPT trial), episodes sorted, gzip's header time fixed at 0, rewritten only when its
  content changed: an unchanged run is an unchanged file in git;
* ``skills.jsonl.gz`` / ``guardrails.jsonl.gz``: the namespace's knowledge;
* ``stages.json``: the stages of the namespace's runs and of its usage write-back, with their data.

:func:`restore` puts whatever the store lacks back (a store that already holds as many episodes
as were kept is not read at all). Not ``ExperienceStore.export_jsonl``: that writes one file for
the whole namespace, so a new arm would rewrite (and re-commit) every earlier one.

Save by hand after stopping a run (the benchmarks also save after each stage), and print the
arms' table with paired deltas from what is kept (while the run holds the store, or before its
report exists)::

    python bench/keep.py save runs/evolution-llm-sw18/store.duckdb NAMESPACE bench/results/sw18
    python bench/keep.py table bench/results/sw18
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

from evolve.eval.adapt import adapt_points
from evolve.eval.harness import compare_arms
from evolve.eval.metrics import arm_metrics
from evolve.eval.report import adapt_gain_line
from evolve.schema import ActionSource, Guardrail, Skill, Trajectory
from evolve.stores import ExperienceStore


def _stage_runs(namespace: str) -> tuple[str, ...]:
    """The run ids whose stages a benchmark keeps: its own, and the usage write-back's
    (``evolve.eval.record_usage``: which episodes were counted, so none is counted twice)."""
    return (namespace, f"usage:{namespace}")


def run_file(keep: Path, run_id: str) -> Path:
    """The file that keeps the episodes of ``run_id``."""
    return keep / "episodes" / (re.sub(r"[^A-Za-z0-9_.+-]", "_", run_id) + ".jsonl.gz")


def _knowledge(store: ExperienceStore) -> tuple[tuple[str, Any, Any, Any], ...]:
    """(file stem, model, reader, writer) of each kind of knowledge."""
    return (
        ("skills", Skill, store.skills, store.upsert_skills),
        ("guardrails", Guardrail, store.guardrails, store.upsert_guardrails),
    )


def _write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` (gzipped for ``.gz``) unless the file already holds it; True if written."""
    gz = path.suffix == ".gz"
    if path.is_file() and (gzip.decompress(path.read_bytes()).decode() if gz else path.read_text()) == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(text.encode(), mtime=0) if gz else text.encode())
    tmp.replace(path)
    return True


def _lines(items: list[Any]) -> str:
    return "".join(it.model_dump_json() + "\n" for it in items)


def _read_lines(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode().splitlines() if path.is_file() else []


def save(store: ExperienceStore, namespace: str, keep: str | Path) -> int:
    """Write the namespace's episodes, knowledge and stages under ``keep``; returns how many
    files changed."""
    keep = Path(keep)
    by_run: dict[str, list[Trajectory]] = {}
    for t in store.trajectories(namespace):
        by_run.setdefault(t.run_id or "", []).append(t)
    changed = 0
    for run_id, trajs in by_run.items():
        trajs.sort(key=lambda t: (t.task_id, t.seed, t.id))
        changed += _write_if_changed(run_file(keep, run_id), _lines(trajs))
    for name, _, read, _ in _knowledge(store):
        if items := sorted(read(namespace), key=lambda k: k.id):
            changed += _write_if_changed(keep / f"{name}.jsonl.gz", _lines(items))
    stages = {
        run: {
            name: {"status": st["status"], "data": st["data"]}
            for name, st in sorted(store.stages(run).items())
        }
        for run in _stage_runs(namespace)
    }
    if any(stages.values()):
        text = json.dumps(stages, indent=1, sort_keys=True, default=str) + "\n"
        changed += _write_if_changed(keep / "stages.json", text)
    return changed


def restore(store: ExperienceStore, namespace: str, keep: str | Path) -> dict[str, int]:
    """Put what is kept under ``keep`` and missing from the store back; returns the counts put back
    (episodes, skills, guardrails, stages)."""
    keep = Path(keep)
    out = {"episodes": 0, "skills": 0, "guardrails": 0, "stages": 0}
    kept = [line for f in sorted((keep / "episodes").glob("*.jsonl.gz")) for line in _read_lines(f)]
    if kept and store.count_trajectories(namespace) < len(kept):
        have = {t.id for t in store.trajectories(namespace)}
        missing = [t for line in kept if (t := Trajectory.model_validate_json(line)).id not in have]
        if missing:
            store.add_trajectories(missing)
        out["episodes"] = len(missing)
    for name, model, read, write in _knowledge(store):
        if not (lines := _read_lines(keep / f"{name}.jsonl.gz")):
            continue
        have_ids = {k.id for k in read(namespace)}
        items = [k for line in lines if (k := model.model_validate_json(line)).id not in have_ids]
        if items:
            write(items)
        out[name] = len(items)
    f = keep / "stages.json"
    if f.is_file():
        for run, stages in json.loads(f.read_text()).items():
            have = store.stages(run)
            for name, st in stages.items():
                if name not in have:
                    store.set_stage(run, name, st["status"], st["data"])
                    out["stages"] += 1
    return out


def arm_table(keep: str | Path) -> str:
    """The kept test arms (``episodes/eval_<arm>.jsonl.gz``) as a markdown table, then the paired
    score deltas: the numbers of the benchmark's report (same metrics and bootstrap seed), without
    its store."""
    from evolution import ARMS  # the benchmark's arm order (evolution imports this module)

    eps = Path(keep) / "episodes"
    found = {f.name[len("eval_") : -len(".jsonl.gz")] for f in eps.glob("eval_*.jsonl.gz")}
    res = {
        arm: [Trajectory.model_validate_json(x) for x in _read_lines(eps / f"eval_{arm}.jsonl.gz")]
        for arm in [*[a for a in ARMS if a in found], *sorted(found - set(ARMS))]
    }
    if not res:
        raise FileNotFoundError(f"no kept test arms (episodes/eval_*.jsonl.gz) under {keep}")
    rows = [
        "| arm | episodes | won | score 0-100 [95% CI] | lost (score < 0) | steps | prompt+gen tokens "
        "per step | s per step p50 | model calls / memory-executed steps |",
        "|---|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for arm, ts in res.items():
        m = arm_metrics(arm, ts)
        calls = sum(1 for t in ts for s in t.steps if s.usage.prompt_tokens)
        acted = sum(
            1 for t in ts for s in t.steps if s.action.skill_id or s.action.source == ActionSource.skill
        )
        lost = sum(1 for t in ts if t.score is not None and t.score < 0)
        rows.append(
            f"| {arm} | {m.episodes} | {sum(t.success for t in ts)} | {m.score.mean:.1f} "
            f"[{m.score.lo:.1f}, {m.score.hi:.1f}] | {lost} | {m.steps_mean:.1f} | "
            f"{m.prompt_tokens_per_step:.0f}+{m.completion_tokens_per_step:.0f} | {m.latency_p50_s:.1f} | "
            f"{calls} / {acted} |"
        )
    rows.append("")
    for c in compare_arms(res):
        d = c.score_delta
        rows.append(
            f"- {c.a} - {c.b}: {d.mean:+.1f} [{d.lo:.1f}, {d.hi:.1f}] score points ({c.paired_episodes} paired)"
        )
    return "\n".join(rows)


def adapt_table(keep: str | Path) -> str:
    """The kept ADAPT trials (``episodes/adapt_*_<trial>.jsonl.gz``, one group per ADAPT setting):
    each task's score by trial, the curve over tasks, and trial 1 to the last trial paired over
    the tasks that reached it; "" when nothing of ADAPT is kept. Works on a stopped run."""
    groups: dict[str, dict[int, list[Trajectory]]] = {}
    for f in sorted((Path(keep) / "episodes").glob("adapt_*.jsonl.gz")):
        prefix, _, trial = f.name[: -len(".jsonl.gz")].rpartition("_")
        if trial.isdigit():
            groups.setdefault(prefix, {})[int(trial)] = [
                Trajectory.model_validate_json(x) for x in _read_lines(f)
            ]
    out: list[str] = []
    for prefix, per_trial in groups.items():
        points = adapt_points(per_trial)
        trials = [p.trial for p in points]
        tasks = list(dict.fromkeys(t for p in points for t in p.task_scores))
        out += [
            f"ADAPT {prefix}: score 0-100 by trial",
            "",
            "| task | " + " | ".join(f"trial {k}" for k in trials) + " |",
            "|---|" + "---:|" * len(trials),
        ]
        for task in tasks:
            cells = [f"{p.task_scores[task]:.0f}" if task in p.task_scores else "" for p in points]
            out.append(f"| {task} | " + " | ".join(cells) + " |")
        out.append(
            "| mean [95% CI] (tasks) | "
            + " | ".join(f"{p.score.fmt()} ({p.episodes})" for p in points)
            + " |"
        )
        if line := adapt_gain_line(points):
            out += ["", f"- {line}"]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["table"]:
        ap = argparse.ArgumentParser(
            description="print the kept test arms' table with paired deltas, and the kept ADAPT trials"
        )
        ap.add_argument("keep", help="the directory kept in git")
        t = ap.parse_args(argv[1:])
        adapt = adapt_table(t.keep)
        try:
            print(arm_table(t.keep))
        except FileNotFoundError as e:
            if not adapt:
                sys.exit(str(e))
        if adapt:
            print("\n" + adapt)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "restore"], help="or 'table KEEP'")
    ap.add_argument("store", help="the benchmark's store.duckdb")
    ap.add_argument("namespace")
    ap.add_argument("keep", help="the directory kept in git")
    a = ap.parse_args(argv)
    if a.action == "save" and not Path(a.store).is_file():
        sys.exit(f"no store at {a.store}: give the benchmark's OUT/store.duckdb")
    store = ExperienceStore(a.store, namespace=a.namespace, embedder="hash")
    try:
        if a.action == "save":
            if a.namespace not in store.list_namespaces():
                sys.exit(
                    f"no namespace '{a.namespace}' in {a.store}; it has: {', '.join(store.list_namespaces())}"
                )
            print(f"{save(store, a.namespace, a.keep)} files changed under {a.keep}")
        else:
            print(f"restored {restore(store, a.namespace, a.keep)} into {a.store}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
