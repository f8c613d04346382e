"""Shared test peers: a real local HTTP server speaking the OpenAI chat protocol, ``transformers
serve`` on a tiny model, tiny saved models, free loopback ports.

Every peer is a real server on 127.0.0.1 and the real ``openai`` client talks to it; nothing is
mocked. :class:`ChatPeer` answers from a script, for what no installable server shows on demand
(llama.cpp's HTTP 500 on ``json_schema``, transient 503s, stalls, a well-formed answer, top-k
log-probs with token ids); ``serve_url`` is ``transformers serve`` itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from tiny_models import build_tiny_causal_lm  # noqa: E402

# Starting ``transformers serve`` (torch + transformers + fastapi in a fresh process) takes ~18 s
# on an idle 2-core machine and 40 s or more when it is busy.
SERVER_START_LIMIT_S = 120.0


def find_free_port() -> int:
    """A loopback port nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """``free_port()`` -> a loopback port nothing listens on."""
    return find_free_port


# --------------------------------------------------------------------------- scripted OpenAI peer

Reply = tuple[Any, ...]
"""``(200, content)`` answers; ``(status, message)`` fails with that HTTP status;
``("sleep", seconds, content)`` stalls, then answers ``content``."""


class ChatPeer:
    """An OpenAI-compatible endpoint on 127.0.0.1 answering ``POST /v1/chat/completions`` from a script.

    ``script`` replies are consumed one per request, the last one repeating. ``reject_formats``
    lists response_format types refused with ``reject_status`` (422 like vLLM's validation, 500
    like llama-cpp-python for ``json_schema``). Error replies carry ``retry-after-ms`` (as
    OpenAI's servers do), which the openai client honours, so retries cost milliseconds. When a
    request asks for ``logprobs``, the answer's whitespace-separated pieces come back as tokens
    (named ``token_id:<n>`` when ``token_ids``), each with ``top_logprobs`` alternatives.
    ``requests`` and ``headers`` record what was received.
    """

    def __init__(
        self,
        script: list[Reply],
        *,
        reject_formats: tuple[str, ...] = (),
        reject_status: int = 422,
        usage: tuple[int, int] = (11, 5),
        token_ids: bool = False,
        retry_after_ms: int = 5,
    ) -> None:
        self.script = list(script)
        self.reject_formats = reject_formats
        self.reject_status = reject_status
        self.usage = usage
        self.token_ids = token_ids
        self.retry_after_ms = retry_after_ms
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.rstrip("/").endswith("/models"):
                    peer._send(
                        self, 200, {"object": "list", "data": [{"id": "peer-model", "object": "model"}]}
                    )
                else:
                    peer._send(self, 404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with peer._lock:
                    peer.requests.append(body)
                    peer.headers.append(dict(self.headers))
                    reply = peer.script.pop(0) if len(peer.script) > 1 else peer.script[0]
                peer._answer(self, body, reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a stalled handler must not hold up the test
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    # -- protocol

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status >= 400 and self.retry_after_ms is not None:
            h.send_header("retry-after-ms", str(self.retry_after_ms))
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            pass

    def _logprobs(self, content: str, k: int) -> dict[str, Any]:
        pieces = content.split() or [""]
        out = []
        for i, piece in enumerate(pieces):
            tok = f"token_id:{100 + i}" if self.token_ids else piece
            top = [
                {
                    "token": f"token_id:{100 + i + j}" if self.token_ids else f"{piece}~{j}",
                    "logprob": -0.5 - j,
                    "bytes": None,
                }
                for j in range(k)
            ]
            out.append({"token": tok, "logprob": -0.5, "bytes": None, "top_logprobs": top})
        return {"content": out}

    def _answer(self, h: BaseHTTPRequestHandler, body: dict[str, Any], reply: Reply) -> None:
        if not h.path.endswith("/chat/completions"):
            self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        fmt = (body.get("response_format") or {}).get("type")
        if fmt in self.reject_formats:
            self._send(
                h, self.reject_status, {"error": {"message": f"response_format {fmt!r} not supported"}}
            )
            return
        if reply[0] == "sleep":
            time.sleep(reply[1])
            reply = (200, reply[2])
        status, content = reply[0], reply[1]
        if status != 200:
            self._send(
                h, status, {"error": {"message": content or f"scripted {status}", "type": "server_error"}}
            )
            return
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": content},
        }
        if body.get("logprobs"):
            choice["logprobs"] = self._logprobs(content, int(body.get("top_logprobs") or 0))
        p, c = self.usage
        self._send(
            h,
            200,
            {
                "id": "chatcmpl-peer",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", ""),
                "choices": [choice],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            },
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_peer() -> Iterator[Callable[..., ChatPeer]]:
    """``chat_peer(script, **options)`` -> a running :class:`ChatPeer` (closed after the test).

    The response-format cache is cleared around each test: a new peer may reuse a port.
    """
    from evolve.llm.client import clear_format_cache

    peers: list[ChatPeer] = []
    clear_format_cache()

    def start(script: list[Reply], **kw: Any) -> ChatPeer:
        peers.append(ChatPeer(script, **kw))
        return peers[-1]

    yield start
    for p in peers:
        p.close()
    clear_format_cache()


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 chat model + tokenizer saved with ``save_pretrained`` (built offline)."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the tiny model, loaded through ``evolve.llm.hf`` (CPU, float32)."""
    from evolve.llm.hf import load_causal_lm

    return load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")


# The server process builds the tiny model itself, then serves it: torch and transformers are
# imported once, there, and the test process needs only the openai client.
_SERVE = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from tiny_models import build_tiny_causal_lm; "
    "build_tiny_causal_lm(sys.argv[2]); from transformers.cli.transformers import main; "
    "sys.argv[0] = 'transformers'; sys.exit(main())"
)


@pytest.fixture(scope="session")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the ``transformers serve`` process writes its tiny model (also the served model name)."""
    return tmp_path_factory.mktemp("served-lm") / "tiny"


@pytest.fixture(scope="session")
def serve_url(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``transformers serve`` pinned to the tiny model on a free loopback port; yields its ``/v1`` URL."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    (hf_home / "hub").mkdir()  # transformers serve scans the hub cache and fails without it
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    port = find_free_port()
    log_path = hf_home / "serve.log"
    cmd = [sys.executable, "-c", _SERVE, str(TESTS_DIR), "serve", str(served_model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + SERVER_START_LIMIT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {log_path.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"transformers serve did not listen within {SERVER_START_LIMIT_S:.0f} s")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
