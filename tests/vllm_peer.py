"""A local HTTP server speaking vLLM's OpenAI-compatible protocol, backed by a real tiny model.

vLLM itself cannot run on this machine (no GPU build), so the API-teacher tests run the real client
code (openai's ``completions.create`` and ``chat.completions.create``) against this server:
``POST /v1/completions`` with token-id prompts and ``prompt_logprobs=k`` answers, per prompt
position, ``{token_id: {"logprob", "rank", "decoded_token"}}`` as vLLM does (the actual token plus
the top k), computed by a real transformers forward pass; ``POST /v1/chat/completions`` answers
with the model's greedy reply. Knobs make it misbehave the ways real servers do: no prompt log-probs
(OpenAI / llama.cpp), or noisy ones (non-deterministic scoring).
"""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class VLLMPeer:
    def __init__(
        self, model: Any, tokenizer: Any, *, prompt_logprobs: bool = True, noise: float = 0.0
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompt_logprobs = prompt_logprobs
        self.noise = noise
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with peer._lock:
                    peer.requests.append({"path": self.path, **body})
                    if self.path.endswith("/completions") and "chat" not in self.path:
                        out = peer._completion(body)
                    else:
                        out = peer._chat(body)
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def scoring_calls(self) -> int:
        return sum(1 for r in self.requests if "prompt_logprobs" in r)

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        import torch

        ids = body["prompt"]
        k = int(body.get("prompt_logprobs") or 0)
        choice: dict[str, Any] = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
        if self.prompt_logprobs and k:
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            rows: list[Any] = [None]
            for pos in range(1, len(ids)):
                lp = logp[pos - 1]
                if self.noise:
                    lp = lp + torch.tensor(random.gauss(0, self.noise))
                top = torch.topk(lp, k)
                entry = {
                    str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                    for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                }
                actual = ids[pos]
                entry.setdefault(str(actual), {"logprob": float(lp[actual]), "rank": 0, "decoded_token": ""})
                rows.append(entry)
            choice["prompt_logprobs"] = rows
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1},
        }

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        from evolve.llm import hf

        gen = hf.generate(
            self.model, self.tokenizer, [body["messages"]], max_new_tokens=body.get("max_tokens") or 32
        )
        g = gen[0]
        return {
            "id": "chat-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": len(g.prompt_ids),
                "completion_tokens": len(g.token_ids),
                "total_tokens": len(g.prompt_ids) + len(g.token_ids),
            },
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
