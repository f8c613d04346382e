"""A policy backed by a local transformers causal LM (full logits, no server)."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from evolve.agents.base import Decision
from evolve.errors import LLMError, PolicyError
from evolve.llm import hf
from evolve.llm.prompts import (
    PromptOptions,
    allowed_actions,
    build_messages,
    fallback_command,
    parse_answer,
    repair_messages,
    select_actions,
)
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Privileged, Step, Task, TokenUsage

log = logging.getLogger(__name__)

HFMode = Literal["generate", "rank"]
_SENTINEL = "\x00EVOLVE_ACTION\x00"


class HFPolicy:
    """Chooses actions with a local causal LM and its chat template.

    ``mode="generate"``: the model writes an answer (greedy when ``temperature == 0``), parsed and
    repaired like :class:`~evolve.agents.policies.openai_policy.OpenAIPolicy`'s.
    ``mode="rank"``: every admissible candidate (pre-filtered to ``max_candidates``) is scored by
    the log-probability of its tokens as the assistant's reply; the prompt is run once and its KV
    cache shared by a batch of candidates. Ranking always returns an admissible action.
    """

    needs_privileged = False

    def __init__(
        self,
        path: str | Path,
        *,
        mode: HFMode = "generate",
        device: str = "auto",
        dtype: str = "auto",
        temperature: float = 0.0,
        max_tokens: int = 64,
        seed: int | None = None,
        rank_reduction: Literal["mean", "sum"] = "mean",
        max_candidates: int = 60,
        rank_batch_size: int = 16,
        prompt: PromptOptions | None = None,
        name: str | None = None,
        _model: Any = None,
        _tokenizer: Any = None,
    ) -> None:
        if mode not in ("generate", "rank"):
            raise PolicyError(f"unknown HF policy mode {mode!r}; use 'generate' or 'rank'")
        self.path = str(path)
        self.mode = mode
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.rank_reduction = rank_reduction
        self.max_candidates = max_candidates
        self.rank_batch_size = max(1, rank_batch_size)
        fmt = "command" if mode == "rank" else "json"
        self.prompt = prompt or PromptOptions(action_format=fmt)
        self.name = name or f"hf:{Path(self.path).name or self.path}:{mode}"
        self.total_usage = TokenUsage()
        self._goal = ""
        self._steps = 0
        if _model is not None:
            # A live model (e.g. the student a trainer updates): used in place, never copied, and
            # its train/eval mode is left as the caller set it (each call restores it).
            self.model, self.tokenizer = _model, _tokenizer
            self.device = str(hf.model_device(_model))
        else:
            self.device = hf.resolve_device(device)
            try:
                self.model, self.tokenizer = hf.load_causal_lm(self.path, device=self.device, dtype=dtype)
            except LLMError as e:
                raise PolicyError(str(e)) from None

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **kwargs: Any) -> HFPolicy:
        """Wrap an already loaded, live model (e.g. the student a trainer is updating)."""
        path = getattr(model, "name_or_path", "") or "in-memory"
        return cls(path, _model=model, _tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ Policy protocol

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self._goal = task.goal
        self._steps = 0

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        t0 = time.perf_counter()
        self._steps += 1
        messages = self.messages(obs, history, memory)
        gen: hf.Generation | None = None
        # Actions refused in this state (MemoryContext.blocked) are neither ranked nor accepted.
        admissible = allowed_actions(obs.admissible_actions, memory)
        if self.mode == "rank" and admissible:
            action, usage, error = self._rank(messages, obs, history, memory, admissible)
        else:
            action, usage, error, gen = self._generate_action(messages, admissible)
        self.total_usage = self.total_usage + usage
        return Decision(
            action=action,
            usage=usage,
            latency_s=time.perf_counter() - t0,
            error=error,
            token_ids=gen.token_ids if gen is not None else None,
            logprobs=gen.logprobs if gen is not None else None,
            prompt_token_ids=gen.prompt_ids if gen is not None else None,
        )

    def messages(self, obs: Observation, history: list[Step], memory: MemoryContext) -> list[dict[str, str]]:
        """The chat messages this policy renders for one step."""
        return build_messages(self._goal or obs.goal, obs, history, memory, self.prompt)

    # ------------------------------------------------------------------ generate

    def _generate_action(
        self, messages: list[dict[str, str]], admissible: list[str] | None
    ) -> tuple[Action, TokenUsage, str | None, hf.Generation | None]:
        """The action, its cost, the error if it fell back, and the generation that chose it."""
        gen = self._generate_one(messages)
        usage = self._usage(gen)
        raw = gen.text
        parsed = parse_answer(raw, admissible)
        if parsed.command is None:
            gen2 = self._generate_one(repair_messages(messages, raw, parsed.problem or "invalid"))
            usage = usage + self._usage(gen2)
            retry = parse_answer(gen2.text, admissible)
            if retry.command is not None:
                parsed, raw, gen = retry, gen2.text, gen2
        if parsed.command is None:
            action = Action(text=fallback_command(admissible), source=ActionSource.fallback, raw=raw)
            return action, usage, f"invalid model output after retry: {parsed.problem}", None
        return Action(text=parsed.command, thought=parsed.thought, raw=raw), usage, None, gen

    @staticmethod
    def _usage(gen: hf.Generation) -> TokenUsage:
        return TokenUsage(prompt_tokens=len(gen.prompt_ids), completion_tokens=len(gen.token_ids))

    def _generate_one(self, messages: list[dict[str, str]]) -> hf.Generation:
        # Reproducible sampling per (seed, step) without depending on earlier calls.
        seed = self.seed * 100_003 + self._steps if self.seed is not None else None
        return hf.generate(
            self.model,
            self.tokenizer,
            [messages],
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            seed=seed,
        )[0]

    def generate(self, messages: list[dict[str, str]]) -> tuple[str, TokenUsage]:
        """The model's answer to chat messages, and the tokens it cost."""
        gen = self._generate_one(messages)
        return gen.text, self._usage(gen)

    # ------------------------------------------------------------------ rank

    def _rank(
        self,
        messages: list[dict[str, str]],
        obs: Observation,
        history: list[Step],
        memory: MemoryContext,
        admissible: list[str],
    ) -> tuple[Action, TokenUsage, str | None]:
        skill_text = " ".join(s.text() for s in memory.skills)
        candidates = select_actions(
            admissible,
            self._goal or obs.goal,
            obs.text,
            skill_text,
            cap=self.max_candidates,
            recent=[s.action.text for s in history[-3:]],
        )
        scores, usage = self.score_candidates(messages, candidates)
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        top = sorted(zip(candidates, scores, strict=True), key=lambda x: -x[1])[:5]
        raw = json.dumps({c: round(s, 4) for c, s in top})
        return Action(text=candidates[best], source=ActionSource.policy, raw=raw), usage, None

    def _continuation_parts(self, messages: list[dict[str, str]]) -> tuple[str, str, str]:
        """(prompt text, text before the action, text after it) as the chat template renders a reply."""
        tok = self.tokenizer
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        if full.startswith(prompt) and _SENTINEL in full:
            pre, post = full[len(prompt) :].split(_SENTINEL, 1)
            # Score the end-of-turn token too: otherwise 'open' beats 'open door' just by being shorter.
            return prompt, pre, post.rstrip()
        return prompt, "", tok.eos_token or ""

    def score_candidates(
        self, messages: list[dict[str, str]], candidates: list[str]
    ) -> tuple[list[float], TokenUsage]:
        """Log-probability (mean or sum over tokens) of each candidate as the assistant's reply."""

        prompt, pre, post = self._continuation_parts(messages)
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        cand_ids = [tok(pre + c + post, add_special_tokens=False)["input_ids"] for c in candidates]
        n_prompt = prompt_ids.shape[1]
        usage = TokenUsage(prompt_tokens=int(n_prompt + sum(len(c) for c in cand_ids)))
        with hf.eval_mode(self.model):
            # Only the last position's logits are needed: skip the vocabulary projection of the rest.
            out = self.model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)
            first_logits = out.logits[:, -1:, :]
            cache = out.past_key_values
            scores: list[float] = []
            for i in range(0, len(cand_ids), self.rank_batch_size):
                chunk = cand_ids[i : i + self.rank_batch_size]
                scores += self._score_chunk(prompt_ids, first_logits, cache, chunk)
        return scores, usage

    def _score_chunk(
        self, prompt_ids: Any, first_logits: Any, cache: Any, chunk: list[list[int]]
    ) -> list[float]:
        import torch

        n, n_prompt = len(chunk), prompt_ids.shape[1]
        width = max(len(c) for c in chunk)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((n, width), dtype=torch.long, device=self.device)
        for j, c in enumerate(chunk):
            ids[j, : len(c)] = torch.tensor(c, device=self.device)
            mask[j, : len(c)] = 1
        try:
            # The prompt's KV cache, copied once per chunk and repeated across its candidates.
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(n)
            attn = torch.cat([torch.ones((n, n_prompt), dtype=torch.long, device=self.device), mask], dim=1)
            pos = torch.arange(n_prompt, n_prompt + width, device=self.device).unsqueeze(0).expand(n, -1)
            out = self.model(input_ids=ids, attention_mask=attn, past_key_values=past, position_ids=pos)
            logits = torch.cat([first_logits.expand(n, -1, -1), out.logits[:, :-1, :]], dim=1)
        except (AttributeError, NotImplementedError, TypeError) as e:
            # Caches that cannot be copied/repeated: score prompt + candidate in full instead.
            log.debug("shared-prompt scoring unavailable (%s); scoring full sequences", e)
            full = torch.cat([prompt_ids.expand(n, -1), ids], dim=1)
            attn = torch.cat([torch.ones((n, n_prompt), dtype=torch.long, device=self.device), mask], dim=1)
            logits = self.model(input_ids=full, attention_mask=attn).logits[:, n_prompt - 1 : -1, :]
        # Upcast one chunk at a time: never a float32 copy of every candidate's logits at once.
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        logp = logp * mask
        total = logp.sum(dim=1)
        if self.rank_reduction == "mean":
            total = total / mask.sum(dim=1).clamp(min=1)
        return [float(x) for x in total]
