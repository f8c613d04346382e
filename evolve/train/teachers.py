"""Teachers for on-policy distillation, behind one small protocol.

A teacher does two things for the trainer:

* ``score(prompts, completions)``: its view of the student's own tokens. ``prompts[i]`` is the
  teacher's prompt (the student's, or the student's with a privileged block), ``completions[i]``
  the student's answer tokens. It returns, per answer token, either its **final hidden state**
  (``full`` teachers: the loss projects it through :meth:`output_weight` one chunk at a time, so a
  ``[tokens, 151,936]`` logit tensor never exists) or its **top-k log-probs** and tail mass
  (``topk`` teachers: an API).
* ``act(messages, contexts)``: write a turn itself (teacher-turn mixing, and the sampled-teacher
  alternative when an endpoint cannot score a given text).

Implementations:

* :class:`LocalTeacher`: a local transformers model sharing the student's tokenizer (checked by
  vocabulary, not by size: Qwen2.5-0.5B and 1.5B both have 151,936 logit rows, 7B 152,064).
* :class:`SelfTeacher`: the student itself, shown privileged context (OPSD's gold path, Skill-SD's
  learned skills), with its weights at the start of training (LoRA adapters disabled; a frozen copy
  under full fine-tuning) or its current weights.
* :class:`APITeacher`: an OpenAI-compatible completions endpoint that returns *prompt* log-probs
  (vLLM's ``prompt_logprobs``): the student's tokens are sent as token ids, so no re-tokenisation
  can shift them. It self-tests before it is trusted (the same text scored twice must agree), and
  every answer is cached in the store's ``teacher_logprobs`` table by a hash of (teacher, prompt,
  completion) as int32 ids + float16 log-probs + tail mass: a second epoch costs no teacher calls.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from evolve.agents.rollout import TeacherAnswer
from evolve.errors import EvolveError, LLMError
from evolve.llm import hf
from evolve.llm.prompts import add_privileged
from evolve.schema import TeacherLogprobs

Messages = list[dict[str, str]]


class TeacherError(EvolveError):
    """A teacher cannot be used as configured; the message says what to change."""


@dataclass
class Scored:
    """A teacher's view of one completion (``n`` tokens)."""

    hidden: Any = None
    """[n, d] final hidden states predicting each completion token (full teachers)."""
    topk_ids: Any = None
    """[n, k] long (topk teachers)."""
    topk_logprobs: Any = None
    """[n, k] float32."""
    tail_logprob: Any = None
    """[n] float32, log of the mass outside the top k."""


class Teacher(Protocol):
    name: str
    kind: Literal["full", "topk"]

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Scored]:
        """Per completion token: hidden states (full) or top-k log-probs (topk)."""
        ...

    def output_weight(self) -> Any:
        """The ``[V, d]`` output layer a full teacher's hidden states go through (None for topk)."""
        ...

    def act(self, messages: Sequence[Messages], contexts: Sequence[str]) -> list[TeacherAnswer]:
        """Answers written by the teacher (its view: ``add_privileged(messages, context)``)."""
        ...


def check_same_vocabulary(student_tok: Any, teacher_tok: Any, student: str, teacher: str) -> None:
    """One-line :class:`TeacherError` unless both tokenizers map the same strings to the same ids."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise TeacherError(
            f"teacher {teacher!r} has a different vocabulary than student {student!r} "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens); distill only between models that share "
            "a tokenizer (e.g. Qwen2.5-Coder-1.5B -> 0.5B)"
        )


def answer_ids(tokenizer: Any, messages: Messages, text: str) -> list[int]:
    """Token ids of ``text`` as the assistant's reply to ``messages``, through its end-of-turn token.

    Rendered by the chat template (prompt + reply) and cut after the prompt, so the ids are the ones
    the student would have generated; falls back to ``text`` + eos when the template is not prefix-
    stable.
    """
    prompt = hf.chat_prompt_ids(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": text}], tokenize=True, return_dict=True
    )["input_ids"]
    eos = tokenizer.eos_token_id
    if list(full[: len(prompt)]) == prompt:
        reply = list(full[len(prompt) :])
        if eos in reply:
            return reply[: reply.index(eos) + 1]
        return reply + ([eos] if eos is not None else [])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])


def _hidden_rows(
    model: Any, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], batch_size: int
) -> list[Any]:
    """Final hidden states predicting each completion token, per sequence (no grad, right-padded)."""
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = hf.model_device(model)
    out: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(prompts), batch_size):
                rows = list(zip(prompts[b : b + batch_size], completions[b : b + batch_size], strict=True))
                width = max(len(p) + len(c) for p, c in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
                mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
                for i, (p, c) in enumerate(rows):
                    ids[i, : len(p) + len(c)] = torch.tensor([*p, *c], dtype=torch.long, device=device)
                    mask[i, : len(p) + len(c)] = 1
                hidden = causal_lm.get_decoder()(
                    input_ids=ids, attention_mask=mask, use_cache=False
                ).last_hidden_state
                for i, (p, c) in enumerate(rows):
                    if not p:
                        raise ValueError("a teacher needs a non-empty prompt")
                    out.append(hidden[i, len(p) - 1 : len(p) + len(c) - 1].clone())
    finally:
        model.train(was_training)
    return out


class LocalTeacher:
    """A local transformers causal LM with the student's tokenizer: full logits, one forward per batch."""

    kind: Literal["full", "topk"] = "full"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "local",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.calls = 0

    @classmethod
    def load(
        cls, path: str, student_tokenizer: Any, *, student: str = "student", dtype: str = "float32", **kw: Any
    ) -> LocalTeacher:
        """Load from a directory or GGUF file; refuses a vocabulary other than the student's."""
        try:
            model, tok = hf.load_causal_lm(path, device="cpu", dtype=dtype, require_chat_template=False)
        except LLMError as e:
            raise TeacherError(str(e)) from None
        check_same_vocabulary(student_tokenizer, tok, student, path)
        return cls(model, student_tokenizer, name=f"local:{path}", **kw)

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Scored]:
        self.calls += 1
        return [Scored(hidden=h) for h in _hidden_rows(self.model, prompts, completions, self.batch_size)]

    def output_weight(self) -> Any:
        return self.model.get_output_embeddings().weight.detach()

    def act(self, messages: Sequence[Messages], contexts: Sequence[str]) -> list[TeacherAnswer]:
        views = [add_privileged(m, c) for m, c in zip(messages, contexts, strict=True)]
        gens = hf.generate(
            self.model,
            self.tokenizer,
            views,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
        )
        return [TeacherAnswer(text=g.text, token_ids=g.token_ids) for g in gens]


class SelfTeacher(LocalTeacher):
    """The student itself as its own teacher, shown privileged context (OPSD / Skill-SD / pi-Distill).

    ``weights="initial"``: the student as training started (LoRA adapters switched off for the
    teacher's pass; under full fine-tuning a frozen copy is kept): a fixed target, the stable
    choice. ``weights="current"``: the model being trained, under no grad (the teacher improves
    with the student, as in OPSD).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        weights: Literal["initial", "current"] = "initial",
        batch_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> None:
        self.live = model
        self.weights = weights
        self.tokenizer = tokenizer
        self.name = f"self:{weights}"
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.calls = 0
        self._frozen = None
        if weights == "initial" and not hasattr(model, "disable_adapter"):
            self._frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self._frozen if self._frozen is not None else self.live

    def _view(self) -> Any:
        if self.weights == "initial" and self._frozen is None:
            return self.live.disable_adapter()  # peft: the base weights for the block
        return nullcontext()

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Scored]:
        self.calls += 1
        with self._view():
            rows = _hidden_rows(self.model, prompts, completions, self.batch_size)
        return [Scored(hidden=h) for h in rows]

    def output_weight(self) -> Any:
        m = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return m.get_output_embeddings().weight.detach()

    def act(self, messages: Sequence[Messages], contexts: Sequence[str]) -> list[TeacherAnswer]:
        with self._view():
            return super().act(messages, contexts)


class APITeacher:
    """An OpenAI-compatible completions endpoint that returns prompt log-probs (vLLM's protocol).

    Request: ``POST /v1/completions`` with ``prompt`` = token ids (teacher prompt + student answer),
    ``max_tokens=1``, ``prompt_logprobs=k``; the answer's ``prompt_logprobs[i]`` maps token ids to
    ``{"logprob": ...}`` for position i. Servers without prompt log-probs (OpenAI's API, llama.cpp's
    server) are refused by :meth:`self_test` with one line pointing at the sampled-teacher mode.
    """

    kind: Literal["full", "topk"] = "topk"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        tokenizer: Any,
        api_key_env: str = "OPENAI_API_KEY",
        top_k: int = 20,
        store: Any = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> None:
        from evolve.llm.client import ChatClient

        self.client = ChatClient(
            model, base_url=base_url, api_key_env=api_key_env, timeout_s=timeout_s, max_retries=max_retries
        )
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.store = store
        self.name = f"api:{model}@{self.client.base_url}"
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.calls = 0
        """Scoring requests sent (cache hits send none)."""
        self.cache_hits = 0

    # -------------------------------------------------------------- scoring

    def _request(self, ids: Sequence[int]) -> list[dict[str, Any] | None]:
        import openai

        try:
            resp = self.client.openai().completions.create(
                model=self.client.model,
                prompt=list(ids),
                max_tokens=1,
                temperature=0.0,
                extra_body={"prompt_logprobs": self.top_k},
            )
        except openai.APIError as e:
            raise self.client._error(e) from None
        self.calls += 1
        choice = resp.choices[0]
        plp = getattr(choice, "prompt_logprobs", None)
        if plp is None and getattr(choice, "model_extra", None):
            plp = choice.model_extra.get("prompt_logprobs")
        if not plp or len(plp) != len(ids):
            raise TeacherError(
                f"teacher endpoint {self.client.base_url} gave no prompt log-probs for the student's tokens "
                "(needs vLLM's prompt_logprobs); use on_policy.teacher_mode: sampled (teacher-written turns "
                "as SFT targets) or a local teacher"
            )
        return plp

    def _parse(self, entries: Sequence[dict[str, Any] | None], start: int) -> TeacherLogprobs:
        ids, lps, tails = [], [], []
        for entry in entries[start:]:
            pairs = sorted(
                (
                    (int(t), float(v["logprob"] if isinstance(v, dict) else v))
                    for t, v in (entry or {}).items()
                ),
                key=lambda x: -x[1],
            )[: self.top_k]
            ids.append([t for t, _ in pairs])
            lps.append([v for _, v in pairs])
            mass = sum(math.exp(v) for _, v in pairs)
            tails.append(math.log1p(-mass) if mass < 1.0 - 1e-6 else float("-inf"))
        return TeacherLogprobs(
            prompt_hash="", teacher=self.name, token_ids=ids, logprobs=lps, tail_logprob=tails
        )

    def prompt_hash(self, prompt: Sequence[int], completion: Sequence[int]) -> str:
        h = hashlib.sha256(f"{self.name}|k={self.top_k}|".encode())
        h.update(",".join(map(str, prompt)).encode() + b"|" + ",".join(map(str, completion)).encode())
        return h.hexdigest()

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[Scored]:
        import torch

        keys = [self.prompt_hash(p, c) for p, c in zip(prompts, completions, strict=True)]
        cached = self.store.get_teacher_logprobs(keys, self.name) if self.store is not None else {}
        fresh: list[TeacherLogprobs] = []
        out: list[Scored] = []
        for key, p, c in zip(keys, prompts, completions, strict=True):
            rec = cached.get(key)
            if rec is None or len(rec.token_ids) != len(c):
                entries = self._request([*p, *c])
                rec = self._parse(entries, len(p)).model_copy(update={"prompt_hash": key})
                fresh.append(rec)
            else:
                self.cache_hits += 1
            k = max(1, max((len(r) for r in rec.token_ids), default=1))
            ids = torch.zeros((len(c), k), dtype=torch.long)
            lps = torch.full((len(c), k), float("-inf"))
            for i, (r_ids, r_lps) in enumerate(zip(rec.token_ids, rec.logprobs, strict=True)):
                ids[i, : len(r_ids)] = torch.tensor(r_ids, dtype=torch.long)
                lps[i, : len(r_lps)] = torch.tensor(r_lps, dtype=torch.float32)
            tail = torch.tensor(rec.tail_logprob, dtype=torch.float32)
            out.append(Scored(topk_ids=ids, topk_logprobs=lps, tail_logprob=tail))
        if fresh and self.store is not None:
            self.store.put_teacher_logprobs(fresh)
        return out

    def output_weight(self) -> Any:
        return None

    def self_test(self, tolerance: float = 0.05) -> None:
        """Score one text twice; refuse the endpoint when the two answers disagree or lack log-probs."""
        tok = self.tokenizer
        ids = tok("You are in the kitchen. There is an apple on the table.", add_special_tokens=False)[
            "input_ids"
        ]
        if len(ids) < 2:
            ids = [*ids, *ids, *ids]
        a = self._parse(self._request(ids), 1)
        b = self._parse(self._request(ids), 1)
        for pos, (ra, rb, la, lb) in enumerate(
            zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs, strict=True)
        ):
            da, db = dict(zip(ra, la, strict=True)), dict(zip(rb, lb, strict=True))
            common = set(da) & set(db)
            if not common or max(abs(da[t] - db[t]) for t in common) > tolerance:
                raise TeacherError(
                    f"teacher endpoint {self.client.base_url} scored the same text twice with different "
                    f"log-probs (position {pos + 1}); use a deterministic server (temperature-free scoring, "
                    "no speculative decoding) or a local teacher"
                )
        self.calls -= 2  # the probe is not a teaching call

    # -------------------------------------------------------------- acting

    def act(self, messages: Sequence[Messages], contexts: Sequence[str]) -> list[TeacherAnswer]:
        out = []
        for m, c in zip(messages, contexts, strict=True):
            res = self.client.complete(
                add_privileged(m, c), temperature=self.temperature, max_tokens=self.max_new_tokens
            )
            out.append(TeacherAnswer(text=res.text, token_ids=answer_ids(self.tokenizer, m, res.text)))
        return out


__all__ = [
    "APITeacher",
    "LocalTeacher",
    "Scored",
    "SelfTeacher",
    "Teacher",
    "TeacherError",
    "answer_ids",
    "check_same_vocabulary",
]
