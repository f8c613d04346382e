"""Every bad input gets one clear line (issue 17): a case per kind of mistake, through the real CLI.

Each case runs ``evolve`` in-process (``evolve.cli.main``, exactly what the console script runs)
and checks: a non-zero exit, at most 3 lines on stderr naming what was wrong, no traceback, and a
store that was there before unchanged in rows. The last cases run the CLI in a fresh process to
show the same holds there (lazy imports, progress bars, loggers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from cli_helpers import run_cli

from evolve import cli
from evolve.errors import EnvError, StoreError
from evolve.schema import Outcome, Task
from evolve.stores import ExperienceStore, HashingEmbedder
from evolve.stores.langgraph_store import EvolveStore

STORE = "runs/bad/store.duckdb"


def rows(path: Path) -> dict[str, int]:
    """Rows per table of a DuckDB file, read without evolve (and without writing to it)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {t: int(con.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]) for t in sorted(tables)}
    finally:
        con.close()


def assert_one_clear_line(code: int, err: str, *expected: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, err
    for e in expected:
        assert e in err, (e, err)
    return err


def job(tmp_path: Path, **changes: Any) -> Path:
    """A small valid job (offline policies, the quickstart env) with ``changes`` merged in."""
    data: dict[str, Any] = {
        "name": "bad",
        "run_dir": str(tmp_path / "runs" / "bad"),
        "env": {"name": "textworld", "kwargs": {"n_train": 2, "n_dev": 1, "n_test": 1}},
        "policies": {"teacher": {"kind": "oracle"}, "student": {"kind": "random", "seed": 0}},
        "store": {"path": str(tmp_path / STORE), "namespace": "bad", "embedder": "hash"},
        "stages": {"collect": {"policy": "teacher", "episodes": 1, "max_steps": 3}},
    }
    for dotted, value in changes.items():
        cur = data
        *parts, last = dotted.split(".")
        for k in parts:
            cur = cur.setdefault(k, {})
        cur[last] = value
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A store that already holds a run's rows: bad inputs must leave them as they are."""
    p = tmp_path / STORE
    with ExperienceStore(p, namespace="bad", embedder=HashingEmbedder(32)) as s:
        s.upsert_run("earlier", {"name": "earlier"}, "done", "bad")
        s.set_stage("earlier", "collect", "done", {"episodes": 0})
    return p


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------ 1. command-line usage
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "--no-such-option"], "No such option"),
        (["store", "search", "q", "--store", STORE, "--k", "abc"], "--k"),
        (["store", "search", "q", "--store", STORE, "--k", "-1"], "--k"),
        (["store", "search", "q", "--store", STORE, "--k", "0"], "--k"),
        (["store", "stats", "--store", STORE, "extra-arg"], "unexpected extra argument"),
    ],
)
def test_usage_errors(
    argv: list[str], expected: str, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_clear_line(code, err, expected)
    assert rows(store_path) == before


# ------------------------------------------------------------------ 2. unreadable input files
def test_unreadable_job_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "jobdir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00name: x\n\x80")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for path, expected in [
        ("jobdir", "is not a file"),
        ("binary.yaml", "not a UTF-8 text file"),
        ("broken.yaml", "not valid YAML at line"),
        ("list.yaml", "must be a YAML mapping"),
        ("missing.yaml", "not found"),
    ]:
        code, _, err = run_cli(["run", path], capsys)
        assert_one_clear_line(code, err, expected)
    assert not (tmp_path / "runs").exists()


def test_unknown_env_kwarg_names_the_key_and_the_accepted_ones(
    tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(["run", str(job(tmp_path, **{"env.kwargs.n_trian": 3}))], capsys)
    assert_one_clear_line(code, err, "env.kwargs", "'n_trian'", "accepted:", "n_train")
    code, _, err = run_cli(["run", str(job(tmp_path, **{"env.kwargs.game_type": "no-such-game"}))], capsys)
    assert_one_clear_line(code, err, "no-such-game")
    assert rows(store_path) == before


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\xff\xfe garbage \x80\n", "not UTF-8"),
        (b'{"not": "closed"\n', "not a JSON trajectory"),
        (b'{"id": "t1", "task_id": "x", "env": "e", "score": NaN}\n', "NaN"),
        (b'{"id": "t1", "task_id": "x", "env": "e", "score": Infinity}\n', "Infinity"),
        (
            b'{"id": "t1", "task_id": "x", "env": "e", "outcome": "exploded"}\n',
            "invalid trajectory at 'outcome'",
        ),
        (b"[1, 2]\n", "invalid trajectory"),
    ],
)
def test_bad_trajectory_files_import_nothing(
    tmp_path: Path, store_path: Path, content: bytes, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    before = rows(store_path)
    code, _, err = run_cli(["store", "import", str(src), "--store", str(store_path)], capsys)
    assert_one_clear_line(code, err, expected, "in.jsonl")
    assert rows(store_path) == before


def test_trajectory_path_that_is_a_directory(
    tmp_path: Path, store_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(["store", "import", str(tmp_path), "--store", str(store_path)], capsys)
    assert_one_clear_line(code, err, "is not a file")
    assert rows(store_path) == before


# ------------------------------------------------------------------ 3. foreign or broken index files
def test_a_broken_index_file_is_rebuilt_not_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "s.duckdb"
    with ExperienceStore(p, namespace="bad", embedder=HashingEmbedder(32)) as s:
        s.index_texts("skill", [("s1", "bad", "open the fridge"), ("s2", "bad", "take the apple")])
        s.vector_index("skill")
    for f in Path(str(p) + ".index").glob("*.index"):
        f.write_bytes(b"\x00garbage, not a FAISS index")
    with ExperienceStore(p, namespace="bad", embedder=HashingEmbedder(32)) as s:
        assert s.search_vector(HashingEmbedder(32).embed(["open the fridge"])[0], "skill", k=1)[0].id == "s1"


# ------------------------------------------------------------------ 4. resource limits
def test_alias_bomb_and_huge_job_files_are_refused_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = ["name: bomb", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb += ["env: {name: textworld, kwargs: {x: *a8}}"]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    code, _, err = run_cli(["run", "bomb.yaml"], capsys)
    assert_one_clear_line(code, err, "anchors and aliases expand to", "YAML nodes")
    (tmp_path / "loop.yaml").write_text("name: loop\nenv: &e {name: textworld, kwargs: {self: *e}}\n")
    code, _, err = run_cli(["run", "loop.yaml"], capsys)
    assert err and code != 0 and "Traceback" not in err  # a recursive alias: refused, one line
    assert_one_clear_line(code, err, "expand to")
    big = tmp_path / "big.yaml"
    big.write_text("name: big\nenv: {name: textworld, kwargs: {pad: '" + "x" * (2 << 20) + "'}}\n")
    code, _, err = run_cli(["run", "big.yaml"], capsys)
    assert_one_clear_line(code, err, "too large for a job file")


# ------------------------------------------------------------------ 5. nonsense values
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"stages.collect.episodes": 10**15}, "stages.collect.episodes"),
        ({"stages.collect.episodes": -3}, "greater than 0"),
        ({"stages.collect.episodes": 0}, "greater than 0"),
        ({"stages.collect.seeds": []}, "stages.collect.seeds"),
        ({"stages.collect.workers": 0}, "stages.collect.workers"),
        ({"store.namespace": ""}, "namespace '' is not a valid name"),
        ({"store.namespace": "../../"}, "is not a valid name"),
        ({"store.namespace": "a/b"}, "is not a valid name"),
        (
            {"policies.teacher": {"kind": "openai", "model": "m", "base_url": "not a url"}},
            "is not a URL",
        ),
        ({"policies.teacher": {"kind": "openai", "model": "m", "base_url": "ftp://x"}}, "is not a URL"),
        ({"stages.eval": {"policy": "student", "learning_curve": [0, -1]}}, "learning_curve"),
    ],
)
def test_nonsense_values_are_refused(
    tmp_path: Path,
    store_path: Path,
    changes: dict[str, Any],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(["run", str(job(tmp_path, **changes))], capsys)
    assert_one_clear_line(code, err, expected)
    assert rows(store_path) == before


def test_set_into_a_scalar_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["run", str(job(tmp_path)), "--set", "name.x=1"], capsys)
    assert_one_clear_line(code, err, "--set name.x", "not a mapping")


@pytest.mark.parametrize(
    "argv",
    [
        ["store", "stats", "--store", STORE, "--namespace", "nope"],
        ["store", "export", "out.jsonl", "--store", STORE, "--namespace", "nope"],
        ["store", "search", "q", "--store", STORE, "--namespace", "nope"],
        ["skills", "list", "--store", STORE, "--namespace", "nope"],
    ],
)
def test_a_namespace_that_does_not_exist_is_refused_everywhere(
    tmp_path: Path, store_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_clear_line(code, err, "unknown namespace 'nope'", "known:")
    assert rows(store_path) == before
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("ns", ["", "../../", "a b"])
def test_import_into_a_namespace_that_is_no_name(
    tmp_path: Path, store_path: Path, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("")
    before = rows(store_path)
    code, _, err = run_cli(
        ["store", "import", str(src), "--store", str(store_path), "--namespace", ns], capsys
    )
    assert_one_clear_line(code, err, "--namespace", "is not a valid name")
    assert rows(store_path) == before


# ------------------------------------------------------------------ 6. a failed run exits non-zero
def endpoint_job(tmp_path: Path, base_url: str) -> Path:
    return job(
        tmp_path,
        **{
            "policies.teacher": {
                "kind": "openai",
                "model": "m",
                "base_url": base_url,
                "max_retries": 0,
                "timeout_s": 5,
            }
        },
    )


def failed_run_state(tmp_path: Path) -> tuple[str, str, list[str]]:
    with ExperienceStore(tmp_path / STORE, read_only=True, embedder=HashingEmbedder(32)) as s:
        run = {r["id"]: r for r in s.runs()}["bad"]
        stage = s.stages("bad")["collect"]
        errors = [t.metadata["error"] for t in s.trajectories("bad") if t.outcome == Outcome.error]
    return run["status"], stage["status"], errors


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ((500, "the model crashed"), "HTTP 500"),
        ((429, "slow down"), "HTTP 429"),
        ((401, "bad key"), "HTTP 401"),
        ((404, "no such model"), "HTTP 404"),
    ],
)
def test_a_failing_endpoint_fails_the_run(
    tmp_path: Path,
    chat_peer: Callable[..., Any],
    reply: tuple[int, str],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    peer = chat_peer([reply], retry_after_ms=1)
    code, _, err = run_cli(["run", str(endpoint_job(tmp_path, peer.url))], capsys)
    assert_one_clear_line(code, err, "stage collect", expected, peer.url, "rerun the same command")
    run, stage, errors = failed_run_state(tmp_path)
    assert (run, stage) == ("failed", "failed") and len(errors) == 1


def test_an_endpoint_that_is_down_fails_the_run_and_a_rerun_retries(
    tmp_path: Path,
    free_port: Callable[[], int],
    chat_peer: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    code, _, err = run_cli(["run", str(endpoint_job(tmp_path, down))], capsys)
    assert_one_clear_line(code, err, "cannot connect", "is the server up?")
    assert failed_run_state(tmp_path)[:2] == ("failed", "failed")
    # The endpoint is back (a garbage answer: the policy falls back, the episode is not an error).
    peer = chat_peer([(200, "not json at all")])
    code, _, err = run_cli(["run", str(endpoint_job(tmp_path, peer.url))], capsys)
    assert code == 0, err
    run, stage, errors = failed_run_state(tmp_path)
    assert (run, stage, errors) == ("done", "done", [])


@pytest.fixture
def raw_endpoint() -> Any:
    """``raw_endpoint(body, content_type)`` -> the URL of a real HTTP server answering every POST with it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    servers: list[ThreadingHTTPServer] = []

    def start(body: bytes, content_type: str) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html>502 Bad Gateway</html>", "text/html"),
        (b'{"id": "x", "result": "not a chat"}', "application/json"),
    ],
)
def test_an_endpoint_answering_garbage_fails_the_run(
    tmp_path: Path, raw_endpoint: Any, body: bytes, content_type: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = raw_endpoint(body, content_type)
    code, _, err = run_cli(["run", str(endpoint_job(tmp_path, url))], capsys)
    assert_one_clear_line(code, err, "not a chat completion", url, "OpenAI-compatible")
    assert failed_run_state(tmp_path)[:2] == ("failed", "failed")


def test_a_hanging_endpoint_costs_one_deadline_per_call_not_every_attempt(
    chat_peer: Callable[..., Any],
) -> None:
    from evolve.errors import LLMConnectionError
    from evolve.llm.client import ChatClient

    peer = chat_peer([("sleep", 5.0, "late")])
    chat = ChatClient("m", base_url=peer.url, timeout_s=0.3, max_retries=10, deadline_s=1.0)
    with pytest.raises(LLMConnectionError) as info:
        chat.complete([{"role": "user", "content": "hi"}])
    msg = str(info.value)
    assert "deadline" in msg and "\n" not in msg and peer.url in msg
    # Each retry waits >= 0.375 s after a 0.3 s attempt: a 1 s deadline leaves room for 3 at most,
    # where the openai client alone would have made 11 attempts of 0.3 s each.
    assert 1 <= len(peer.requests) <= 3


# ------------------------------------------------------------------ 7. validated before the first write
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"env.name": "no-such-env"}, "unknown env 'no-such-env'"),
        ({"stages.collect.max_steps": -1}, "stages.collect.max_steps"),
        ({"policies.teacher": {"kind": "hf", "path": "/no/such/model"}}, "policies.teacher.path"),
        ({"store.embedder": "/no/such/embedder"}, "store.embedder"),
        ({"env.kwargs.n_dev": 0, "stages.distill": {}}, "no tasks in split 'dev'"),
    ],
)
def test_mistakes_found_before_the_store_is_written(
    tmp_path: Path,
    store_path: Path,
    changes: dict[str, Any],
    expected: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = rows(store_path)
    code, _, err = run_cli(["run", str(job(tmp_path, **changes))], capsys)
    assert_one_clear_line(code, err, expected)
    assert rows(store_path) == before  # no runs row marked failed, no run_stages row left running


class FlakyEnv:
    """An env whose task list works for the pre-flight check, then fails inside the stage."""

    calls = 0
    name = "flaky"

    def __init__(self, **kwargs: Any) -> None:
        pass

    def tasks(self, split: Any) -> list[Task]:
        FlakyEnv.calls += 1
        if FlakyEnv.calls > 1:
            raise EnvError("the game server went away; restart it and rerun the same command")
        return [Task(id="t0", env="flaky", split=split)]

    def close(self) -> None:
        pass


def test_a_stage_that_raises_is_marked_failed_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FlakyEnv.calls = 0
    p = job(tmp_path, **{"env": {"name": "test_bad_inputs:FlakyEnv", "kwargs": {}}})
    code, _, err = run_cli(["run", str(p)], capsys)
    assert_one_clear_line(code, err, "the game server went away")
    with ExperienceStore(tmp_path / STORE, read_only=True, embedder=HashingEmbedder(32)) as s:
        assert s.stages("bad")["collect"]["status"] == "failed"
        assert {r["id"]: r["status"] for r in s.runs()} == {"bad": "failed"}


# ------------------------------------------------------------------ 8. LangGraph store (see also test_langgraph_store)
def test_langgraph_store_errors_read_like_langgraph(tmp_path: Path) -> None:
    with EvolveStore(path=tmp_path / "lg.duckdb") as s:
        with pytest.raises(ValueError, match="Invalid filter key"):
            s.search(("a",), filter={"": 1})
        with pytest.raises(ValueError, match="Unsupported operator"):
            s.search(("a",), filter={"x": {"$near": 1}})


# ------------------------------------------------------------------ 9. what users see
def test_store_stats_title_keeps_the_namespace(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["store", "stats", "--store", str(store_path), "--namespace", "bad"], capsys)
    assert code == 0, err
    assert "[bad]" in out


def test_store_in_use_by_another_process_is_one_line(store_path: Path) -> None:
    hold = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); time.sleep(60)",
            str(store_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout is not None and hold.stdout.readline().strip() == "ready"
        r = subprocess.run(
            [sys.executable, "-m", "evolve.cli", "store", "stats", "--store", str(store_path)],
            capture_output=True,
            text=True,
        )
        assert_one_clear_line(r.returncode, r.stderr, f"is in use by pid {hold.pid}")
    finally:
        hold.kill()
        hold.wait()


def test_in_a_fresh_process_no_progress_bar_precedes_the_error(tmp_path: Path) -> None:
    """MiniLM (the default embedder) would draw 'Loading weights' on stderr: the error comes alone."""
    p = job(tmp_path, **{"store.embedder": "default", "stages.collect.max_steps": -5})
    r = subprocess.run([sys.executable, "-m", "evolve.cli", "run", str(p)], capture_output=True, text=True)
    assert_one_clear_line(r.returncode, r.stderr, "max_steps")
    assert "Loading weights" not in r.stderr
    src = tmp_path / "nan.jsonl"
    src.write_text(json.dumps({"id": "t"})[:-1] + ', "score": NaN}\n')
    with ExperienceStore(tmp_path / "s.duckdb", embedder=HashingEmbedder(8)):
        pass
    before = rows(tmp_path / "s.duckdb")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "evolve.cli",
            "store",
            "import",
            str(src),
            "--store",
            str(tmp_path / "s.duckdb"),
        ],
        capture_output=True,
        text=True,
    )
    assert_one_clear_line(r.returncode, r.stderr, "NaN")
    assert rows(tmp_path / "s.duckdb") == before


def test_store_error_class_is_an_evolve_error() -> None:
    assert issubclass(StoreError, cli.EvolveError)
