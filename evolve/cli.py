"""The ``evolve`` command line: run jobs, evaluate, and inspect stores, runs and knowledge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from evolve import __version__
from evolve.errors import EvolveError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Make LLM agents better from their own experience."
)
store_app = typer.Typer(no_args_is_help=True, help="Inspect and maintain an ExperienceStore.")
runs_app = typer.Typer(no_args_is_help=True, help="List and show job runs.")
skills_app = typer.Typer(no_args_is_help=True, help="List, show and roll back skills and guardrails.")
app.add_typer(store_app, name="store")
app.add_typer(runs_app, name="runs")
app.add_typer(skills_app, name="skills")
console = Console()

StoreOpt = typer.Option(
    "runs/quickstart/store.duckdb", "--store", "-s", help="Path of the store's DuckDB file."
)
NsOpt = typer.Option(None, "--namespace", "-n", help="Namespace (tenant); default: the store's default.")


def _version(value: bool) -> None:
    if value:
        console.print(f"evolve {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


def _open(path: str, namespace: str | None = None, read_only: bool = True):  # noqa: ANN202
    from evolve.stores import ExperienceStore

    p = Path(path)
    if not p.exists():
        raise EvolveError(f"store '{p}' does not exist; run `evolve run` first or pass --store PATH")
    store = ExperienceStore(p, read_only=read_only, embedder=None)
    try:
        if namespace is None:
            nss = [n for n in store.list_namespaces() if n != "default"]
            store.namespace = nss[0] if len(nss) == 1 else "default"
        else:
            store._check_namespace(namespace)  # reading a namespace that is not there is a typo
            store.namespace = namespace
    except BaseException:
        store.close()
        raise
    return store


def _namespace_name(namespace: str | None) -> str | None:
    from evolve.config import check_namespace

    if namespace is None:
        return None
    try:
        return check_namespace(namespace)
    except ValueError as e:
        raise EvolveError(f"--namespace: {e}") from None


@app.command()
def run(
    job: Path | None = typer.Argument(None, help="Job YAML; none = the embedded quickstart."),
    stage: list[str] | None = typer.Option(None, "--stage", help="Run only this stage (repeatable)."),
    run_id: str | None = typer.Option(None, "--run-id", help="Resume or name a run (default: the job name)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start the run over: forget its finished stages."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a field: --set stages.eval.episodes=4"
    ),
) -> None:
    """Run a job: collect -> diagnose -> distill -> synth -> train -> eval (resumable)."""
    from evolve.config import load_job
    from evolve.pipeline import run_job

    cfg = load_job(job, _overrides(set_))
    result = run_job(cfg, stages=stage, run_id=run_id, fresh=fresh, console=console)
    if result.get("report"):
        console.print(f"\n[bold green]report:[/] {result['report']}")


def _overrides(set_: list[str] | None) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for item in set_ or []:
        if "=" not in item:
            raise EvolveError(f"--set '{item}' must look like key.path=value")
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    return overrides


@app.command()
def train(
    job: Path = typer.Argument(..., help="Job YAML with stages.train."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="The run whose student is trained (default: the job name)."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a field: --set stages.train.max_steps=50"
    ),
) -> None:
    """Run only the train stage of a job: train the student on the stored examples, record the
    checkpoint, and make it the run's student only if it beats the current one on the dev split."""
    from evolve.config import load_job
    from evolve.pipeline import run_job

    cfg = load_job(job, _overrides(set_))
    result = run_job(cfg, stages=["train"], run_id=run_id, console=console)
    data = result["stages"]["train"]
    console.print(f"\n[bold green]checkpoint:[/] {data['checkpoint']} ({data['status']}) at {data['path']}")


@app.command("eval")
def eval_(
    job: Path | None = typer.Argument(None, help="Job YAML; none = the embedded quickstart."),
    run_id: str | None = typer.Option(None, "--run-id"),
    adapt: int = typer.Option(
        0,
        "--adapt",
        help="ADAPT (CLIN's protocol) instead of the arms: the first N eval tasks, each over --trials "
        "trials, memory distilled from the task's earlier trials before each one.",
    ),
    trials: int = typer.Option(5, "--trials", help="Trials per task for --adapt."),
    adapt_start: str = typer.Option(
        "empty",
        "--adapt-start",
        help="Memory at trial 1 for --adapt: empty | knowledge (the store's active).",
    ),
) -> None:
    """Run only the eval stage of a job (its knowledge must already be distilled), or ADAPT."""
    from evolve.config import load_job
    from evolve.pipeline import adapt_job, run_job

    cfg = load_job(job)
    if adapt:
        result = adapt_job(cfg, adapt, trials, adapt_start, run_id=run_id, console=console)
    else:
        result = run_job(cfg, stages=["eval"], run_id=run_id, console=console)
    if result.get("report"):
        console.print(f"\n[bold green]report:[/] {result['report']}")


@app.command("export-gguf")
def export_gguf(
    checkpoint: Path = typer.Argument(..., help="Merged HF checkpoint dir of a trained student."),
    base: str = typer.Option(
        ..., "--base", help="The GGUF the student was trained from (a path or pkg:<module>/<file>)."
    ),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write."),
    type_: str = typer.Option(
        "f16", "--type", help="Type of the tensors training changed: f16 | q8_0 | f32."
    ),
) -> None:
    """Export a trained student to GGUF for llama.cpp: the base file with only the tensors training
    changed rewritten (its tokenizer and chat template kept)."""
    from evolve.llm.gguf_export import export_gguf as export

    r = export(checkpoint, base, out, changed_type=type_)  # type: ignore[arg-type]  # checked inside
    console.print(
        f"[bold green]gguf:[/] {escape(r.out_path)}: {len(r.rewritten)} rewritten ({r.changed_type}), "
        f"{len(r.copied)} copied from the base; {r.out_bytes / 1e6:.1f} MB in {r.seconds:.1f} s",
        soft_wrap=True,
    )


# ---------------------------------------------------------------- store
@store_app.command("stats")
def store_stats(store: str = StoreOpt, namespace: str | None = NsOpt) -> None:
    """Counts per table, outcomes, namespaces."""
    with _open(store, namespace) as st:
        s = st.stats()
    t = Table(title=escape(f"{s['path']} [{s['namespace']}]"))
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in s.items():
        if k not in ("path", "namespace"):
            t.add_row(k, str(v))
    console.print(t)


@store_app.command("search")
def store_search(
    query: str,
    store: str = StoreOpt,
    namespace: str | None = NsOpt,
    kind: str = typer.Option("skill", help="trajectory | skill | guardrail"),
    k: int = typer.Option(5, min=1, max=10_000, help="How many hits."),
    mode: str = typer.Option("hybrid", help="hybrid | dense | keyword"),
) -> None:
    """Hybrid (dense + BM25) search within one namespace."""
    with _open(store, namespace, read_only=False) as st:
        hits = st.search(query, kind=kind, k=k, mode=mode)  # type: ignore[arg-type]
    t = Table(title=escape(f"{kind} hits for {query!r}"))
    for c in ("score", "dense", "bm25", "id", "text"):
        t.add_column(c)
    for h in hits:
        t.add_row(
            f"{h.score:.4f}",
            f"{h.dense_score or 0:.3f}",
            f"{h.keyword_score or 0:.2f}",
            escape(h.id),
            escape(h.text[:90]),
        )
    console.print(t)


@store_app.command("export")
def store_export(
    out: Path,
    store: str = StoreOpt,
    namespace: str | None = NsOpt,
    kind: str = typer.Option("trajectories", help="trajectories | skills | guardrails | examples"),
) -> None:
    """Export records as JSON lines."""
    with _open(store, namespace) as st:
        n = st.export_jsonl(out, kind)
    console.print(f"wrote {n} {kind} to {out}")


@store_app.command("import")
def store_import(
    src: Path,
    store: str = StoreOpt,
    namespace: str | None = NsOpt,
    kind: str = typer.Option("trajectories", help="trajectories | skills | guardrails | examples"),
) -> None:
    """Import JSON lines (validated first: all or nothing)."""
    from evolve.stores import ExperienceStore

    with ExperienceStore(store, namespace=_namespace_name(namespace) or "default") as st:
        n = st.import_jsonl(src, kind)
    console.print(f"imported {n} {kind} into {store}")


@store_app.command("rebuild-index")
def store_rebuild(store: str = StoreOpt, namespace: str | None = NsOpt) -> None:
    """Re-derive the FAISS indexes from DuckDB."""
    with _open(store, namespace, read_only=False) as st:
        counts = st.rebuild_index()
    console.print("rebuilt: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


# ---------------------------------------------------------------- runs
@runs_app.command("list")
def runs_list(store: str = StoreOpt) -> None:
    with _open(store) as st:
        runs = st.runs()
        t = Table(title="runs")
        for c in ("id", "namespace", "status", "stages", "updated"):
            t.add_column(c)
        for r in runs:
            stages = st.stages(r["id"])
            done = ",".join(s for s, v in stages.items() if v["status"] == "done")
            t.add_row(r["id"], r["namespace"], r["status"], done, str(r["updated_at"])[:19])
    console.print(t)


@runs_app.command("show")
def runs_show(run_id: str, store: str = StoreOpt) -> None:
    with _open(store) as st:
        runs = {r["id"]: r for r in st.runs()}
        if run_id not in runs:
            raise EvolveError(f"no run '{run_id}' in {store} (runs: {', '.join(runs) or 'none'})")
        stages = st.stages(run_id)
        ckpts = st.checkpoints(runs[run_id]["namespace"], run_id=run_id)
    console.print(f"[bold]{run_id}[/] status={runs[run_id]['status']}")
    for name, v in stages.items():
        console.print(f"  {name}: {v['status']}  {json.dumps(v['data'], default=str)[:300]}")
    if ckpts:
        t = Table(title=f"checkpoints of {run_id}")
        for c in ("id", "policy", "status", "stale", "method", "steps", "dev before -> after", "path"):
            t.add_column(c)
        for c in ckpts:
            dev = c.metrics.get("dev", {})
            b, a = dev.get("before"), dev.get("after")
            res = (
                f"success {100 * b['success']:.0f}% -> {100 * a['success']:.0f}%, "
                f"score {b['score']:.1f} -> {a['score']:.1f} ({dev.get('split')}, {dev.get('paired_episodes')} ep)"
                if b and a
                else "-"
            )
            t.add_row(
                c.id,
                c.policy,
                c.status.value,
                "[red]STALE[/]" if c.stale else "no",
                c.method,
                str(c.metrics.get("train", {}).get("steps", "-")),
                res,
                c.path,
            )
        console.print(t)
        for c in ckpts:
            console.print(
                f"  {c.id}: {c.reason}"
                + (" (stale: a trajectory it was trained on was deleted)" if c.stale else "")
            )


# ---------------------------------------------------------------- skills
@skills_app.command("list")
def skills_list(
    store: str = StoreOpt,
    namespace: str | None = NsOpt,
    status: str | None = typer.Option(None, help="candidate | active | retired"),
) -> None:
    with _open(store, namespace) as st:
        items = [*st.skills(status=status), *st.guardrails(status=status)]
    t = Table(title="knowledge")
    for c in ("id", "kind", "status", "v", "conf", "effect", "text"):
        t.add_column(c)
    for it in items:
        kind = it.kind
        eff = "" if it.stats.effect is None else f"{it.stats.effect:+.2f}"
        t.add_row(
            escape(it.id),
            kind,
            it.status.value,
            str(it.version),
            f"{it.stats.confidence:.2f}",
            eff,
            escape(it.text()[:80]),
        )
    console.print(t)


@skills_app.command("show")
def skills_show(knowledge_id: str, store: str = StoreOpt, namespace: str | None = NsOpt) -> None:
    with _open(store, namespace) as st:
        it = st.get_knowledge(knowledge_id)
        versions = st.knowledge_versions(knowledge_id)
    console.print_json(it.model_dump_json())
    console.print(f"versions: {versions}")


@skills_app.command("rollback")
def skills_rollback(
    knowledge_id: str, version: int, store: str = StoreOpt, namespace: str | None = NsOpt
) -> None:
    with _open(store, namespace, read_only=False) as st:
        it = st.rollback(knowledge_id, version)
    console.print(f"{knowledge_id} now at version {it.version} (content of version {version})")


def main() -> None:
    """Entry point: user mistakes print one line, not a traceback."""
    try:
        app(standalone_mode=False)
    except EvolveError as e:
        # Plain print: a terminal-width wrap would split the one-line message.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted; finished work is saved, rerun the same command to resume")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors arrive here in non-standalone mode
        usage = _usage_error(e)
        if usage is None:
            raise
        print(f"error: {usage}", file=sys.stderr)
        sys.exit(2)


def _usage_error(e: Exception) -> str | None:
    """One line for a command-line usage error (unknown command or option, bad value), else None.

    typer vendors its own click (``typer._click``), whose exceptions are not ``click``'s: both are
    recognised, by class name along the MRO, so neither ends in a traceback.
    """
    names = {c.__name__ for c in type(e).__mro__}
    if "Abort" in names:
        return "aborted"
    if "ClickException" not in names:
        return None
    fmt = getattr(e, "format_message", None)  # BadParameter names the option: "Invalid value for '--k': ..."
    msg = " ".join(str(fmt() if callable(fmt) else e).split())
    msg = msg.rstrip(".")
    hint = "; see evolve --help" if "UsageError" in names else ""
    return f"{msg}{hint}"


if __name__ == "__main__":
    main()
