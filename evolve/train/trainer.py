"""One training loop: SFT or distillation of a causal-LM student on evolve's training examples.

``train(config, examples)`` reads top to bottom:

1. load the student (directory or GGUF) and its tokenizer; check the chat template; a local teacher
   for ``method: distill`` must share the student's vocabulary;
2. tokenize with the chat template's assistant masks (:mod:`evolve.train.data`), hold out
   ``eval_ratio`` of the examples; the batch order of each epoch is a pure function of ``seed`` and
   the epoch, so the whole run is a list of steps fixed in advance, and a resume just skips;
3. LoRA (peft) or full fine-tuning, AdamW and a transformers schedule, all under accelerate (CPU,
   one GPU, DDP on several; bf16 autocast when asked and the device has it);
4. each step: every process takes its share of the step's micro-batches, the number of trained
   tokens is summed over the accumulated batch *and over processes first*, then each micro-batch
   backpropagates ``sum of its per-token losses / that total``; so 2 processes give the same
   update as 1 process with the same global batch, and batch 4 x accumulation 1 the same as 1 x 4;
5. the student's loss never builds ``[batch, seq, vocab]`` logits: the base transformer gives the
   final hidden states, only the trained positions are gathered, and :func:`chunked_loss` projects
   them through the output layer a chunk at a time (the output layer is ~1/5 of a 0.5B model and
   trained tokens a small share of agent chats: the issue's 1.69x over TRL);
6. checkpoints every ``save_every`` steps to ``output_dir/checkpoints/step-N``, written to a temp dir
   with a manifest of sizes and sha256 and renamed: a kill -9 leaves either a whole checkpoint or
   a ``.tmp`` dir; on resume, a checkpoint that fails verification is skipped with one warning line
   and the previous one is used (model/adapter, optimizer, scheduler, python/numpy/torch RNG, step);
7. ``save_pretrained`` of the adapter and of the merged model with the tokenizer and its original
   chat template: ``{"kind": "hf", "path": result.merged_dir}`` is a policy as it is.

Why not TRL's ``SFTTrainer`` / HF ``Trainer``: they compute full logits over every position (the
cost above), and their loss normalisation under accumulation and several processes is per
micro-batch unless configured otherwise; a single loop here is shorter than the configuration.

Heavy libraries (torch, transformers, peft, accelerate) are imported inside :func:`train`, so
importing :class:`TrainConfig` (YAML validation) stays cheap.

Several processes: ``accelerate launch --multi_gpu --num_processes N -m evolve.train.trainer CONFIG.json
EXAMPLES.jsonl`` on GPUs; on CPUs (gloo) ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m
evolve.train.trainer ...`` (``accelerate launch --cpu`` starts one process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evolve.errors import EvolveError
from evolve.schema import ExampleKind, TrainingExample

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

ON_POLICY_METHODS = ("opd", "opsd", "skill_sd", "pi_distill")
"""Methods trained on the student's own rollouts in an env (:mod:`evolve.train.onpolicy`)."""


class TrainError(EvolveError):
    """Training cannot start or continue; the message is one line saying what to change."""


class LoraSettings(BaseModel):
    """peft LoRA adapters on ``target_modules`` ("all-linear": every linear layer but the output)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class OnPolicySettings(BaseModel):
    """Rollouts and teachers of the on-policy methods (``opd | opsd | skill_sd | pi_distill``)."""

    model_config = ConfigDict(extra="forbid")
    envs: int = Field(4, gt=0)
    """Episodes rolled in lockstep per optimizer step (per process): one batched generation per turn."""
    max_turns: int = Field(20, gt=0)
    split: Literal["train", "dev", "test"] = "train"
    temperature: float = Field(1.0, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    action_format: Literal["json", "command"] = "json"
    teacher_mode: Literal["auto", "local", "api", "self", "sampled"] = "auto"
    """auto: ``self`` for opsd/skill_sd/pi_distill; for opd ``api`` when ``teacher_url`` is set, else
    ``local`` (``teacher`` is a model dir). ``sampled``: an API that cannot score given text writes
    turns (``mix`` of them) that are trained with CE."""
    teacher_url: str | None = None
    teacher_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    top_k: int = Field(20, gt=0)
    teacher_weights: Literal["initial", "current"] = "initial"
    """Self teachers: the student as training started (fixed target) or its current weights."""
    mix: float = Field(0.0, ge=0, le=1)
    """Probability that a turn is written by the teacher (the env follows it)."""
    depth_start: int | None = Field(None, gt=0)
    """TCOD's depth curriculum: rollouts start this many turns deep ..."""
    depth_ramp: float = Field(0.5, gt=0, le=1)
    """... and reach ``max_turns`` after this share of the steps."""
    supervise: Literal["all", "parsed"] = "all"
    """Which turns take a loss: all, or only those whose answer parsed to an admissible command."""
    pi_weight: float = Field(1.0, ge=0)
    """pi_distill: weight of the privileged view's CE on the env's next gold action."""


class TrainConfig(BaseModel):
    """What to train, on what, how. Paths are local; nothing is downloaded."""

    model_config = ConfigDict(extra="forbid")
    student: str
    """A model directory (``config.json``) or a ``.gguf`` file."""
    output_dir: str
    method: Literal["sft", "distill", "opd", "opsd", "skill_sd", "pi_distill"] = "sft"
    """sft / distill train on stored examples (:func:`train`); the others on the student's own
    rollouts in an env (:func:`evolve.train.onpolicy.train_on_policy`)."""
    loss: str | None = None
    """A name of ``evolve.train.losses.LOSSES``; None = ce (sft), forward_kl (distill), reverse_kl
    (on-policy, full teacher), topk_forward_kl (API teacher). Distillation losses need a teacher."""
    loss_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the loss (e.g. ``{"beta": 0.5}`` for jsd)."""
    teacher: str | None = None
    """``distill`` / ``opd``: a local HF model directory sharing the student's tokenizer."""
    on_policy: OnPolicySettings = Field(default_factory=OnPolicySettings)
    lora: LoraSettings | None = Field(default_factory=LoraSettings)
    """None = full fine-tuning."""
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (cycling epochs if needed); None = ``epochs``. On-policy:
    the number of rollout + update steps (None = ``ceil(epochs)``)."""
    max_tokens_per_batch: int = Field(4096, gt=0)
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step (over all processes: each takes its share)."""
    max_length: int = Field(2048, gt=1)
    pack: bool = False
    shuffle: bool = True
    """Shuffle the batches each epoch (seeded); False: longest first, the same order every epoch."""
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto = bf16 autocast on a GPU that supports it, float32 otherwise."""
    seed: int = 0
    eval_ratio: float = Field(0.0, ge=0, lt=1)
    eval_every: int | None = Field(None, gt=0)
    """Held-out loss every N steps (and at the end) when ``eval_ratio > 0``."""
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every N steps (and at the last step); None = no checkpoints."""
    keep_checkpoints: int = Field(2, ge=2)
    """At least 2: the previous one is the fallback when the last is corrupt."""
    resume: bool = True
    """Resume from the newest valid checkpoint in ``output_dir`` (False: start over, deleting them)."""
    chunk_size: int = Field(256, gt=0)
    train_on: Literal["last", "all"] = "last"
    max_grad_norm: float | None = Field(1.0, gt=0)
    save_merged: bool = True


class TrainResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output_dir: str
    checkpoint: str | None = None
    """The last step checkpoint written (None without ``save_every``)."""
    adapter_dir: str | None = None
    merged_dir: str | None = None
    steps: int
    resumed_from: int | None = None
    trained_tokens: int
    """Tokens a loss was taken on, over the whole run (resumed steps included)."""
    tokens: int
    """Input tokens processed (padding excluded), over the whole run."""
    losses: list[float]
    """Per optimizer step: sum of per-token losses / trained tokens of the step's global batch."""
    eval_losses: list[tuple[int, float]] = Field(default_factory=list)
    wall_s: float
    tokens_per_s: float
    """Input tokens per second over the steps this call ran."""
    peak_rss_mb: float
    peak_device_mb: float | None = None
    processes: int = 1
    examples: list[str]
    eval_examples: list[str] = Field(default_factory=list)
    trajectories: list[str]
    loss: str | None = None
    """The loss used (the resolved default when the config left it unset)."""
    teacher: str | None = None
    on_policy_stats: list[dict[str, Any]] = Field(default_factory=list)
    """On-policy methods, per step: depth, episodes, successes, turns, trained and teacher-written
    turns, rollout and teacher seconds, generated tokens, pi-Distill's aux loss."""


def loss_name(cfg: TrainConfig) -> str:
    """The loss of an offline method (sft / distill) when ``loss`` is unset."""
    return cfg.loss or ("forward_kl" if cfg.method == "distill" else "ce")


# --------------------------------------------------------------------------- the loop


def train(
    config: TrainConfig,
    examples: Sequence[TrainingExample],
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``config.student`` on ``examples``; returns where everything went and what it cost.

    ``on_step(step, loss)`` is called on every process after each optimizer step (1-based).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_scheduler

    from evolve.llm.hf import pad_id
    from evolve.train.data import make_batches, tokenize_examples
    from evolve.train.losses import make_loss

    cfg = config
    out = Path(cfg.output_dir)
    started = time.monotonic()
    # AcceleratorState is a process-wide singleton that refuses a second mixed-precision setting;
    # reset it (not PartialState, the process group) so train() can run again in one process.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if _use_bf16(cfg.dtype) else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)  # python, numpy, torch: LoRA init and dropout are reproducible

    # 1. models ---------------------------------------------------------------------------------
    if cfg.method in ON_POLICY_METHODS:
        raise TrainError(
            f"method {cfg.method!r} trains on rollouts in an env, not on stored examples: run it from a "
            "job (stages.train) or call evolve.train.onpolicy.train_on_policy"
        )
    if cfg.method == "distill" and not cfg.teacher:
        raise TrainError(
            "method 'distill' needs 'teacher': a local HF model directory with the student's tokenizer"
        )
    loss_fn = make_loss(loss_name(cfg), **cfg.loss_args)
    wants_teacher = bool({"teacher_logits", "teacher_token_logprob"} & set(loss_fn.needs))
    if wants_teacher and cfg.method != "distill":
        raise TrainError(
            f"loss {loss_name(cfg)!r} needs a teacher; set method: distill and teacher: <model dir>"
        )
    model, tokenizer = _load_student(cfg)
    chat_template = tokenizer.chat_template  # the original, saved with the merged model
    teacher = _load_teacher(cfg, tokenizer, model) if cfg.method == "distill" and wants_teacher else None
    _check_logits_are_plain(model)

    # 2. data -------------------------------------------------------------------------------------
    usable = [e for e in examples if e.messages and e.kind in (ExampleKind.sft, ExampleKind.privileged)]
    if not usable:
        raise TrainError(f"none of the {len(examples)} examples is a chat (sft or privileged) to train on")
    train_ex, eval_ex = _split(usable, cfg.eval_ratio, cfg.seed)
    tok_kw = {"max_length": cfg.max_length, "train_on": cfg.train_on}
    try:  # skips (and counts, in one warning) the examples without a trainable token
        train_items, _ = tokenize_examples(tokenizer, train_ex, **tok_kw)
        eval_items, _ = tokenize_examples(tokenizer, eval_ex, **tok_kw)
    except ValueError as e:  # a malformed example (e.g. not ending with the answer)
        raise TrainError(str(e)) from None
    tokenizer.chat_template = chat_template  # whatever a training template did, keep the original
    if not train_items:
        raise TrainError(
            f"no trainable tokens in the {len(train_ex)} training examples (no assistant answer within "
            f"max_length={cfg.max_length}?); raise max_length or check the examples' last message"
        )
    if teacher is not None and any(e.privileged_context for e in train_ex):
        log.warning(
            "the teacher sees the student's view: privileged contexts are not given to it (not built yet)"
        )
    trained_ids = {t.example_id for t in train_items}
    train_ex = [e for e in train_ex if e.id in trained_ids]
    pad = pad_id(tokenizer)

    def epoch_batches(epoch: int) -> list[Any]:
        return make_batches(
            train_items,
            max_tokens=cfg.max_tokens_per_batch,
            pack=cfg.pack,
            seed=cfg.seed + epoch,
            shuffle=cfg.shuffle,
            pad_id=pad,
        )

    micro_per_step = cfg.grad_accum  # over all processes together
    plan = _step_plan(cfg, lambda epoch: len(epoch_batches(epoch)), micro_per_step)
    total_steps = len(plan)
    eval_batches = (
        make_batches(
            eval_items,
            max_tokens=cfg.max_tokens_per_batch,
            pack=cfg.pack,
            seed=cfg.seed,
            shuffle=False,
            pad_id=pad,
        )
        if eval_items
        else []
    )

    # 3. adapters, optimizer, schedule, devices ----------------------------------------------------
    model = _prepare_model(model, cfg)
    model.train()
    student = _with_loss(model, loss_fn, cfg.chunk_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    # The scheduler is not prepared: accelerate would step it once per process per step.
    student, optimizer = accelerator.prepare(student, optimizer)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)

    # 4. resume ------------------------------------------------------------------------------------
    fingerprint = _fingerprint(cfg, train_ex, eval_ex)
    ckpt_root = out / "checkpoints"
    if not cfg.resume and accelerator.is_main_process and ckpt_root.exists():
        shutil.rmtree(ckpt_root)
    accelerator.wait_for_everyone()
    state: dict[str, Any] = {"step": 0, "losses": [], "eval_losses": [], "tokens": 0, "trained_tokens": 0}
    resumed_from = None
    last_ckpt: Path | None = None
    if cfg.resume:
        found = _latest_valid_checkpoint(ckpt_root)
        if found is not None:
            state = _load_checkpoint(found, accelerator, student, optimizer, scheduler, fingerprint)
            resumed_from, last_ckpt = state["step"], found

    # 5. the steps ---------------------------------------------------------------------------------
    bar = _Progress(total_steps, state["step"], enabled=progress and accelerator.is_main_process)
    run_tokens, run_started = 0, time.monotonic()
    batches_epoch, batches = -1, []
    device = accelerator.device
    for step in range(state["step"], total_steps):
        epoch, first = plan[step]
        if epoch != batches_epoch:
            batches_epoch, batches = epoch, epoch_batches(epoch)
        group = batches[first : first + micro_per_step]
        # This process's share; every process runs the same number of micro-batches (a process
        # short of data repeats one with weight 0), so DDP's collectives line up.
        mine = [(b, 1) for b in group[rank::world]]
        per_proc = math.ceil(len(group) / world)
        mine += [(group[0], 0)] * (per_proc - len(mine))
        if hasattr(loss_fn, "set_progress"):
            loss_fn.set_progress(step / max(1, total_steps - 1))

        # The normaliser first: trained tokens of the whole global batch, summed over processes.
        local = sum(int(_predicted_mask(b.labels, b.position_ids).sum()) * w for b, w in mine)
        counts = torch.tensor([local, sum(_n_tokens(b) for b, w in mine if w)], device=device)
        n_trained, n_tokens = (int(x) for x in accelerator.reduce(counts, "sum").tolist())
        scale = world / max(1, n_trained)  # DDP averages gradients over processes: undo the mean
        loss_sum = torch.zeros((), device=device)
        try:
            for i, (b, w) in enumerate(mine):
                sync = i == len(mine) - 1
                with nullcontext() if sync else accelerator.no_sync(student):
                    inputs = _to_device(b, device)
                    teacher_hidden = (
                        _teacher_hidden(teacher, inputs, accelerator) if teacher is not None else None
                    )
                    s = student(**inputs, teacher_hidden=teacher_hidden, teacher_weight=_lm_weight(teacher))
                    accelerator.backward(s * (scale * w))
                loss_sum += s.detach().float() * w
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        except Exception as e:
            if _is_oom(e):
                raise TrainError(_oom_message(cfg, step + 1)) from None
            raise
        step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(1, n_trained)
        state["step"] = step + 1
        state["losses"].append(step_loss)
        state["tokens"] += n_tokens
        state["trained_tokens"] += n_trained
        run_tokens += n_tokens
        done = step + 1 == total_steps
        if eval_batches and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            state["eval_losses"].append((step + 1, _evaluate(student, eval_batches, accelerator, teacher)))
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or done):
            state["fingerprint"] = fingerprint
            last_ckpt = _save_checkpoint(
                ckpt_root, step + 1, accelerator, student, optimizer, scheduler, state, cfg.keep_checkpoints
            )
        bar.update(step + 1, step_loss, run_tokens / max(1e-9, time.monotonic() - run_started))
        if on_step is not None:
            on_step(step + 1, step_loss)
    bar.close()
    run_s = time.monotonic() - run_started

    # 6. save ----------------------------------------------------------------------------------------
    return _finish(
        accelerator, student, tokenizer, chat_template, cfg, out, state,
        started=started, run_s=run_s, run_tokens=run_tokens, resumed_from=resumed_from,
        last_ckpt=last_ckpt, processes=world,
        eval_losses=[tuple(x) for x in state["eval_losses"]],
        examples=[e.id for e in train_ex],
        eval_examples=[e.id for e in eval_ex],
        trajectories=sorted({t for e in train_ex for t in e.provenance}),
        loss=loss_name(cfg),
        teacher=cfg.teacher if teacher is not None else None,
    )  # fmt: skip


def _finish(
    accelerator: Any, student: Any, tokenizer: Any, chat_template: Any, cfg: TrainConfig, out: Path,
    state: dict[str, Any], *, started: float, run_s: float, run_tokens: int, resumed_from: int | None,
    last_ckpt: Path | None, processes: int, **fields: Any,
) -> TrainResult:  # fmt: skip
    """The end of every trainer (SFT here, on-policy in :mod:`evolve.train.onpolicy`): save the
    adapter and the merged model, then the run's :class:`TrainResult` (``fields``: what only that
    trainer knows) to ``out/result.json``."""
    import torch

    adapter_dir, merged_dir = _save_final(accelerator, student, tokenizer, chat_template, cfg, out)
    result = TrainResult(
        output_dir=str(out),
        checkpoint=str(last_ckpt) if last_ckpt else None,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        steps=state["step"],
        resumed_from=resumed_from,
        trained_tokens=state["trained_tokens"],
        tokens=state["tokens"],
        losses=state["losses"],
        wall_s=time.monotonic() - started,
        tokens_per_s=run_tokens / run_s if run_s > 0 and run_tokens else 0.0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        processes=processes,
        **fields,
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(result.model_dump_json(indent=1))
    return result


# --------------------------------------------------------------------------- the student's loss


def _with_loss(model: Any, loss: Any, chunk_size: int) -> Any:
    """``model`` inside a module whose forward is the summed loss of one batch (what DDP wraps).

    DDP must see the forward to synchronise gradients; wrapping the *loss* rather than the
    causal LM lets that forward skip the full-vocabulary output projection.
    """
    import torch

    from evolve.train.losses.base import Target, chunked_loss

    class StudentLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: Any,
            labels: Any,
            attention_mask: Any = None,
            position_ids: Any = None,
            teacher_hidden: Any = None,
            teacher_weight: Any = None,
        ) -> Any:
            causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            hidden = causal_lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            keep = _predicted_mask(labels, position_ids)  # [B, T-1]: position t predicts token t+1
            head = causal_lm.get_output_embeddings()
            target = Target(
                labels=labels[:, 1:][keep], teacher_hidden=teacher_hidden, teacher_weight=teacher_weight
            )
            return chunked_loss(
                loss, hidden[:, :-1][keep], head.weight, target, bias=head.bias, chunk_size=chunk_size
            )

    return StudentLoss()


def _predicted_mask(labels: Any, position_ids: Any = None) -> Any:
    """[B, T-1] bool: positions whose next token is trained (and, packed, in the same sequence)."""
    keep = labels[:, 1:] != IGNORE_INDEX
    if position_ids is not None:
        keep = keep & (position_ids[:, 1:] != 0)  # never predict across a packing boundary
    return keep


def _n_tokens(b: Any) -> int:
    """Input tokens of a batch, padding excluded."""
    m = b.attention_mask
    return int(m.sum()) if m is not None and m.dim() == 2 else int(b.input_ids.numel())


def _teacher_hidden(teacher: Any, inputs: dict[str, Any], accelerator: Any) -> Any:
    """The teacher's final hidden states at the student's trained positions (no grad)."""
    import torch

    with torch.no_grad(), accelerator.autocast():
        hidden = teacher.get_decoder()(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
    return hidden[:, :-1][_predicted_mask(inputs["labels"], inputs.get("position_ids"))]


def _lm_weight(model: Any) -> Any:
    return None if model is None else model.get_output_embeddings().weight


def _to_device(b: Any, device: Any) -> dict[str, Any]:
    return {
        "input_ids": b.input_ids.to(device),
        "labels": b.labels.to(device),
        "attention_mask": None if b.attention_mask is None else b.attention_mask.to(device),
        "position_ids": None if b.position_ids is None else b.position_ids.to(device),
    }


def _evaluate(student: Any, batches: Sequence[Any], accelerator: Any, teacher: Any) -> float:
    """Held-out loss: sum over every process's share of the eval batches / their trained tokens."""
    import torch

    inner = accelerator.unwrap_model(student)  # no DDP collectives: shares may differ in size
    was_training = inner.training
    inner.eval()
    total = torch.zeros(2, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for b in batches[accelerator.process_index :: accelerator.num_processes]:
            inputs = _to_device(b, accelerator.device)
            th = _teacher_hidden(teacher, inputs, accelerator) if teacher is not None else None
            total[0] += inner(**inputs, teacher_hidden=th, teacher_weight=_lm_weight(teacher)).float()
            total[1] += _predicted_mask(inputs["labels"], inputs["position_ids"]).sum()
    inner.train(was_training)
    s, n = accelerator.reduce(total, "sum").tolist()
    return s / max(1.0, n)


# --------------------------------------------------------------------------- models


def _use_bf16(dtype: str) -> bool:
    import torch

    if dtype == "float32":
        return False
    if dtype == "bfloat16":
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()  # CPU autocast has bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _load_student(cfg: TrainConfig) -> tuple[Any, Any]:
    """Student weights in float32 (full fine-tuning keeps float32 master weights under bf16 autocast;
    LoRA over a bf16 base when bf16 is used, the adapters staying float32)."""
    from evolve.llm.hf import load_causal_lm

    p = Path(cfg.student).expanduser()
    if not p.exists():
        raise TrainError(
            f"student model path {cfg.student!r} does not exist; point 'student' at a model dir or .gguf file"
        )
    dtype = "bfloat16" if cfg.lora is not None and _use_bf16(cfg.dtype) else "float32"
    model, tok = load_causal_lm(p, device="cpu", dtype=dtype, require_chat_template=False)
    if not tok.chat_template:
        raise TrainError(f"tokenizer of {cfg.student!r} has no chat template; train a chat (instruct) model")
    return model, tok


def _load_teacher(cfg: TrainConfig, tokenizer: Any, student: Any) -> Any:
    """A frozen local teacher; refuses a tokenizer or output-layer size that differs from the student's."""
    from evolve.llm.hf import load_causal_lm

    assert cfg.teacher is not None
    if not Path(cfg.teacher).expanduser().exists():
        raise TrainError(
            f"teacher model path {cfg.teacher!r} does not exist; point 'teacher' at a local HF model dir"
        )
    dtype = "bfloat16" if _use_bf16(cfg.dtype) else "float32"
    teacher, t_tok = load_causal_lm(cfg.teacher, device="cpu", dtype=dtype, require_chat_template=False)
    if t_tok.get_vocab() != tokenizer.get_vocab():
        raise TrainError(
            f"teacher {cfg.teacher!r} has a different vocabulary than student {cfg.student!r} "
            f"({len(t_tok)} vs {len(tokenizer)} tokens); distill only between models that share a tokenizer"
        )
    vt, vs = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if vt != vs:
        raise TrainError(
            f"teacher output layer has {vt} rows, student {vs}; distill only between same-vocabulary models"
        )
    teacher.eval().requires_grad_(False)
    return teacher


def _prepare_model(model: Any, cfg: TrainConfig) -> Any:
    """Gradient checkpointing when asked, then LoRA adapters (peft) unless full fine-tuning."""
    if cfg.gradient_checkpointing:
        # transformers >= 5.2x names it activation checkpointing (the old name warns); both take
        # the non-reentrant variant, which works with LoRA's frozen inputs.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)  # adapters in float32 even over a bf16 base
    return model


def _save_final(
    accelerator: Any, student: Any, tokenizer: Any, chat_template: Any, cfg: TrainConfig, out: Path
) -> tuple[str | None, str | None]:
    """``save_pretrained`` of the adapter and of the merged model (with the original chat template)."""
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(student).model
    if accelerator.is_main_process:
        tokenizer.chat_template = chat_template
        if cfg.lora is not None:
            final.save_pretrained(str(out / "adapter"))
            tokenizer.save_pretrained(str(out / "adapter"))
        if cfg.save_merged:
            merged = _serializable(final.merge_and_unload() if cfg.lora is not None else final)
            if cfg.gradient_checkpointing:
                disable = getattr(merged, "activation_checkpointing_disable", None)
                (disable or merged.gradient_checkpointing_disable)()
                merged.config.use_cache = True
            merged.save_pretrained(str(out / "merged"))
            tokenizer.save_pretrained(str(out / "merged"))
    accelerator.wait_for_everyone()
    adapter = str(out / "adapter") if cfg.lora is not None else None
    return adapter, (str(out / "merged") if cfg.save_merged else None)


def _serializable(model: Any) -> Any:
    """A GGUF student is loaded dequantised but still marked as quantized, which ``save_pretrained``
    refuses: copy its weights into a plain model of the same architecture."""
    if getattr(model, "hf_quantizer", None) is None:
        return model
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def _check_logits_are_plain(model: Any) -> None:
    """The loss projects hidden states with the output weight itself: refuse models that post-process logits."""
    c = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(c, attr, None) not in (None, 1, 1.0):
            raise TrainError(
                f"{c.model_type} scales its logits ({attr}); this trainer supports plain output layers only"
            )


# --------------------------------------------------------------------------- data plan


def _split(examples: Sequence[TrainingExample], ratio: float, seed: int) -> tuple[list, list]:
    """Held-out examples chosen by a hash of (seed, id): stable whatever the examples' order."""
    if ratio <= 0 or len(examples) < 2:
        return list(examples), []
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * ratio)))
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest())
    held = {e.id for e in ranked[:n_eval]}
    return [e for e in examples if e.id not in held], [e for e in examples if e.id in held]


def _step_plan(cfg: TrainConfig, n_batches: Callable[[int], int], micro: int) -> list[tuple[int, int]]:
    """Every optimizer step as (epoch, first micro-batch): fixed before the first step, so resume skips.

    ``epochs`` may be fractional (the last epoch is cut); ``max_steps`` overrides it, cycling epochs.
    """
    plan: list[tuple[int, int]] = []
    epoch, last = 0, math.ceil(cfg.epochs) - 1
    while (len(plan) < cfg.max_steps) if cfg.max_steps else (epoch <= last):
        steps = math.ceil(n_batches(epoch) / micro)
        if not cfg.max_steps and epoch == last and cfg.epochs % 1:
            steps = math.ceil(steps * (cfg.epochs % 1))
        plan += [(epoch, i * micro) for i in range(steps)]
        epoch += 1
    return plan[: cfg.max_steps] if cfg.max_steps else plan


def _settings_hash(cfg: TrainConfig) -> str:
    """A hash of the settings that change the math (not where it is written or how often saved)."""
    skip = {"output_dir", "resume", "save_every", "keep_checkpoints", "eval_every", "save_merged"}
    return hashlib.sha256(
        json.dumps(cfg.model_dump(exclude=skip), sort_keys=True, default=str).encode()
    ).hexdigest()


def _fingerprint(
    cfg: TrainConfig, train_ex: Sequence[TrainingExample], eval_ex: Sequence[TrainingExample]
) -> str:
    """What a checkpoint must match to be resumed: the settings that change the math, and the data."""
    h = hashlib.sha256(_settings_hash(cfg).encode())
    for e in [*train_ex, *eval_ex]:
        h.update(e.model_dump_json(include={"id", "messages", "privileged_context"}).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoints


def _trainable_state(accelerator: Any, student: Any) -> dict[str, Any]:
    inner = accelerator.unwrap_model(student).model
    return {n: p.detach().cpu().contiguous() for n, p in inner.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_checkpoint(
    root: Path,
    step: int,
    accelerator: Any,
    student: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict,
    keep: int,
) -> Path:
    """Write ``step-N.tmp``, then ``manifest.json`` (sizes + sha256), then rename to ``step-N``."""
    import torch
    from safetensors.torch import save_file

    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    weights = _trainable_state(accelerator, student)
    if accelerator.is_main_process:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state))
    with open(tmp / f"rng-{accelerator.process_index}.pkl", "wb") as f:
        pickle.dump(_rng_state(), f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in _checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint dirs, newest first (``.tmp`` dirs are unfinished writes)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _verify(ckpt: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else why not."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json"
    for name, meta in manifest.get("files", {}).items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _latest_valid_checkpoint(root: Path) -> Path | None:
    bad = []
    for ckpt in _checkpoints(root):
        why = _verify(ckpt)
        if why is None:
            if bad:
                log.warning(
                    "checkpoint %s is corrupt (%s); resuming from %s", bad[0][0].name, bad[0][1], ckpt.name
                )
            return ckpt
        bad.append((ckpt, why))
    if bad:
        log.warning(
            "checkpoint %s is corrupt (%s) and no earlier one is valid; starting over",
            bad[0][0].name,
            bad[0][1],
        )
    return None


def _load_checkpoint(
    ckpt: Path, accelerator: Any, student: Any, optimizer: Any, scheduler: Any, fingerprint: str
) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if state.get("fingerprint") != fingerprint:
        raise TrainError(
            f"{ckpt.parent} holds checkpoints of other settings or data; use a new output_dir or set resume: false"
        )
    inner = accelerator.unwrap_model(student).model
    weights = load_file(str(ckpt / "trainable.safetensors"))
    expected = {n for n, p in inner.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise TrainError(
            f"checkpoint {ckpt} does not hold this model's trainable weights; use a new output_dir"
        )
    with torch.no_grad():
        params = dict(inner.named_parameters())
        for n, w in weights.items():
            params[n].copy_(w)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = ckpt / f"rng-{accelerator.process_index}.pkl"
    if rng.is_file():
        with open(rng, "rb") as f:
            _set_rng_state(pickle.load(f))  # our own file, checksummed above
    else:
        log.warning(
            "checkpoint %s has no RNG state for process %d; dropout will differ",
            ckpt.name,
            accelerator.process_index,
        )
    return state


# --------------------------------------------------------------------------- errors and progress


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or isinstance(e, MemoryError)
    )


def _oom_message(cfg: TrainConfig, step: int) -> str:
    hints = [f"max_tokens_per_batch (now {cfg.max_tokens_per_batch})", f"max_length (now {cfg.max_length})"]
    if not cfg.gradient_checkpointing:
        hints.append("set gradient_checkpointing: true")
    if cfg.lora is None:
        hints.append("use lora instead of full fine-tuning")
    hints.append(f"lower chunk_size (now {cfg.chunk_size})")
    return f"out of memory at step {step}: lower " + ", ".join(hints)


class _Progress:
    """A rich progress bar with the step loss and tokens/s (no-op when disabled)."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.bar = None
        if enabled and total > done:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", tps="-")
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", tps=f"{tps:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evolve.train.trainer CONFIG.json EXAMPLES.jsonl`` (or under ``accelerate launch``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m evolve.train.trainer CONFIG.json EXAMPLES.jsonl", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.model_validate_json(Path(args[0]).read_text())
        lines = Path(args[1]).read_text().splitlines()
        examples = [TrainingExample.model_validate_json(x) for x in lines if x.strip()]
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, examples)
    except EvolveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
