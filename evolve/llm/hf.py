"""Local transformers causal LMs: load (directory or GGUF), batched generation and scoring.

Generation and scoring return token ids and per-token log-probs, and work on a *live* model
object as well as on one loaded from a path, so a trainer can roll out (and score with) the very
model it is training, without a copy. They switch the model to eval mode for the call and restore
the caller's mode afterwards (:func:`eval_mode`); they never leave it flipped.

Log-probs are those of the model's own distribution (raw logits, temperature 1), whatever the
sampling temperature: what on-policy distillation compares against a teacher. They are upcast to
float32 one decoding step (generation) or one sequence slice (scoring) at a time, never as a
``(batch, seq, vocab)`` float32 tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evolve.errors import ModelLoadError

Messages = Sequence[dict[str, Any]]


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' -> bfloat16 on a CUDA device that supports it, float32 otherwise (CPU bf16 is slow)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def load_causal_lm(
    path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    gguf_file: str | None = None,
    require_chat_template: bool = True,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local checkpoint directory or a GGUF file, on ``device``.

    ``path`` may be a directory (with ``config.json``, or holding ``gguf_file``) or a ``.gguf``
    file itself; GGUF weights are dequantised by transformers (``from_pretrained(dir,
    gguf_file=...)``, needs the ``gguf`` package). Nothing is downloaded. The model is in eval mode.
    """
    p = Path(path).expanduser()
    if gguf_file is None and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if gguf_file is not None:
        if not (p / gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {str(p / gguf_file)!r} does not exist")
    elif not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model path {str(path)!r} is not a local model directory (no config.json) nor a .gguf file; "
            "point it at a saved checkpoint"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(str(p), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype, dev), **kw)
    except ImportError as e:
        raise ModelLoadError(f"could not load {str(path)!r}: {' '.join(str(e).split())[:200]}") from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load HF model from {str(path)!r}: {' '.join(str(e).split())[:200]}"
        ) from e
    if require_chat_template and tok.chat_template is None:
        raise ModelLoadError(f"tokenizer at {str(path)!r} has no chat template; a chat model is needed")
    return model.to(dev).eval(), tok


def model_device(model: Any) -> Any:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Eval mode and no autograd for the block; the caller's train/eval mode is restored after."""
    import torch

    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        if was_training:
            model.train()


def pad_id(tokenizer: Any) -> int:
    """The padding token id (the end-of-sequence token when the tokenizer has no pad token)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def chat_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of chat ``messages`` rendered by the chat template, with the generation prompt."""
    enc = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@dataclass
class Generation:
    """One generated answer: the prompt's ids, the answer's ids (up to and with the end token),
    each answer token's log-prob under the model, and the decoded text (special tokens skipped)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Messages] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[Generation]:
    """Answers to a batch of prompts in one ``generate`` call (greedy when ``temperature == 0``).

    A prompt is chat messages (rendered with the chat template and the generation prompt) or
    token ids. Prompts are left-padded to one batch. ``seed`` seeds torch's global generator
    before sampling, for reproducible samples.
    """
    import torch

    if not prompts:
        return []
    ids = [list(p) if p and isinstance(p[0], int) else chat_prompt_ids(tokenizer, p) for p in prompts]  # type: ignore[arg-type]
    device = model_device(model)
    width = max(len(x) for x in ids)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long, device=device)
        mask[i, width - len(x) :] = 1
    sample = temperature > 0
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        kwargs["temperature"] = temperature
        kwargs["top_p"] = top_p
        kwargs["top_k"] = None
        if seed is not None:
            torch.manual_seed(seed)
    else:
        # Greedy: clear sampling knobs a checkpoint's generation_config may carry.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with eval_mode(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
        new = out.sequences[:, width:]
        chosen = new.unsqueeze(-1)
        # One decoding step at a time: log-softmax of that step's raw logits, upcast, gathered.
        step_lps = [
            torch.log_softmax(step.float(), dim=-1).gather(-1, chosen[:, t]).squeeze(-1)
            for t, step in enumerate(out.logits)
        ]
        lps = torch.stack(step_lps, dim=1) if step_lps else torch.zeros_like(new, dtype=torch.float)
    eos = _eos_ids(model, tokenizer)
    result = []
    for i, x in enumerate(ids):
        toks = new[i].tolist()
        n = next((j + 1 for j, t in enumerate(toks) if t in eos), len(toks))
        toks = toks[:n]
        result.append(
            Generation(
                prompt_ids=x,
                token_ids=toks,
                logprobs=[float(v) for v in lps[i, :n].tolist()],
                text=tokenizer.decode(toks, skip_special_tokens=True),
            )
        )
    return result


def score(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt (teacher forcing, right-padded batches)."""
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError("score() needs one completion per prompt")
    device = model_device(model)
    pad = pad_id(tokenizer)
    out: list[list[float]] = []
    with eval_mode(model):
        for b in range(0, len(prompt_ids), max(1, batch_size)):
            rows = [
                (list(p), list(c))
                for p, c in zip(
                    prompt_ids[b : b + batch_size], completion_ids[b : b + batch_size], strict=True
                )
            ]
            width = max(len(p) + len(c) for p, c in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
            mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
            for i, (p, c) in enumerate(rows):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long, device=device)
                mask[i, : len(p) + len(c)] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for i, (p, c) in enumerate(rows):
                if not c:
                    out.append([])
                    continue
                if not p:
                    raise ValueError("score() needs a non-empty prompt (the first token has no context)")
                span = logits[i, len(p) - 1 : len(p) + len(c) - 1].float()
                target = torch.tensor(c, dtype=torch.long, device=device).unsqueeze(-1)
                out.append(
                    [float(v) for v in torch.log_softmax(span, -1).gather(-1, target).squeeze(-1).tolist()]
                )
    return out


__all__ = [
    "Generation",
    "chat_prompt_ids",
    "eval_mode",
    "generate",
    "load_causal_lm",
    "model_device",
    "pad_id",
    "resolve_device",
    "resolve_dtype",
    "score",
]
