"""On-policy distillation in environments, and privileged-information self-distillation.

``train_on_policy(config, env, store)`` is the trainer's loop for ``method: opd | opsd | skill_sd |
pi_distill`` (options of one loop, not four trainers). One optimizer step reads top to bottom:

1. **roll out**: ``on_policy.envs`` episodes, stepped in lockstep by the live student with one
   batched generation per turn (:func:`evolve.agents.rollout.rollout`), recorded to the store with
   ``arm="onpolicy"``. TCOD's depth curriculum caps the horizon at ``depth_start`` turns and grows
   it to ``max_turns`` over the first ``depth_ramp`` of the steps; with probability ``mix`` a turn
   is written by the teacher instead (GKD's λ; the env follows the teacher's action);
2. **pick the turns to supervise** (``supervise: all | parsed``): each is one training row, the
   rendered prompt masked, the answer's tokens trained;
3. **ask the teacher** about the student's tokens, in its own view:
   - ``opd``: a local HF teacher (full logits; same vocabulary checked) or an API teacher (top-k);
   - ``opsd``: the student itself with the env's privileged information (the winning commands from
     the current state / the gold path) in a ``<privileged>`` block;
   - ``skill_sd``: the student itself with the skills and guardrails the store's memory retrieves for
     that state as the privileged block (the student learns to act as if it had read its memory);
   - ``pi_distill``: ``opsd``'s teacher, and the privileged view is trained jointly: a cross-entropy
     term (weight ``pi_weight``) on the env's next gold action given the privileged prompt;
   - an API teacher that cannot score given text (``teacher_mode: sampled``): only teacher-written
     turns are trained, with cross-entropy (DAgger-style: the teacher acts in the student's states);
4. **the loss**: ``reverse_kl`` by default for full teachers (the on-policy standard), ``topk_forward_kl``
   for top-k teachers, ``ce`` in sampled mode, or any loss of :mod:`evolve.train.losses` (``jsd``
   with ``beta``, ``sampled_reverse_kl``, ...), computed chunk by chunk from hidden states (no
   ``[tokens, vocab]`` logits); summed per token and divided by the step's trained tokens summed over
   processes, like the SFT loop;
5. one AdamW step; checkpoints, resume and the saved adapter/merged model as in
   :mod:`evolve.train.trainer` (the same helpers).

One process for now: the step is written for several (each process would roll its own ``envs``
episodes on distinct tasks, with the SFT loop's global normalisation and zero-weight filler batches
so DDP's collectives line up), but every process records its episodes to the store, and a store
file takes one writing process; until rollouts are gathered to rank 0 for recording, a launch with
several processes is refused with one line.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from evolve.agents.base import AgentHooks
from evolve.agents.recorder import Recorder
from evolve.agents.rollout import Rollout, Turn, rollout
from evolve.envs import build_env
from evolve.envs.base import Env
from evolve.llm import hf
from evolve.llm.prompts import PromptOptions, add_privileged, answer_text
from evolve.schema import Action, Observation, Split, Step, Task
from evolve.specs import EnvSpec
from evolve.train.teachers import APITeacher, LocalTeacher, SelfTeacher, Teacher, TeacherError, answer_ids
from evolve.train.trainer import (
    IGNORE_INDEX,
    ON_POLICY_METHODS,
    TrainConfig,
    TrainError,
    TrainResult,
    _finish,
    _is_oom,
    _latest_valid_checkpoint,
    _load_checkpoint,
    _load_student,
    _oom_message,
    _prepare_model,
    _Progress,
    _save_checkpoint,
    _settings_hash,
    _use_bf16,
)

log = logging.getLogger(__name__)

HooksFactory = Callable[[], AgentHooks]


def default_loss(cfg: TrainConfig, teacher_kind: str) -> str:
    """The loss when ``config.loss`` is unset: reverse KL (full teachers), top-k forward KL (API), CE (sampled)."""
    if cfg.loss:
        return cfg.loss
    if cfg.on_policy.teacher_mode == "sampled":
        return "ce"
    return "topk_forward_kl" if teacher_kind == "topk" else "reverse_kl"


def teacher_mode(cfg: TrainConfig) -> str:
    """The teacher a method uses: ``self`` for the privileged methods, ``local``/``api`` for opd."""
    mode = cfg.on_policy.teacher_mode
    if mode != "auto":
        return mode
    if cfg.method in ("opsd", "skill_sd", "pi_distill"):
        return "self"
    return "api" if cfg.on_policy.teacher_url else "local"


def depth_at(cfg: TrainConfig, step: int, total: int) -> int:
    """TCOD's curriculum: the rollout horizon at ``step`` (``max_turns`` when no ``depth_start``)."""
    op = cfg.on_policy
    if op.depth_start is None or op.depth_start >= op.max_turns:
        return op.max_turns
    ramp = max(1, math.ceil(op.depth_ramp * total))
    frac = min(1.0, step / ramp)
    return min(op.max_turns, op.depth_start + math.floor(frac * (op.max_turns - op.depth_start)))


def gold_context(env: Env, task: Task, obs: Observation, history: list[Step]) -> str:
    """OPSD's privileged block: the env's winning commands from here, its gold path and win facts."""
    p = env.privileged()
    parts = []
    if p.notes:
        parts.append(p.notes)
    if p.gold_actions:
        parts.append("Reference solution from the start: " + " -> ".join(p.gold_actions))
    if p.facts:
        parts.append("Facts: " + "; ".join(p.facts))
    return "\n".join(parts)


class _MemoryContexts:
    """Skill-SD's privileged block: what a memory (``knowledge_hooks``) retrieves at each state.

    One hooks object per env slot, restarted when its slot starts a new task.
    """

    def __init__(self, factory: HooksFactory) -> None:
        self.factory = factory
        self.hooks: dict[int, tuple[str, AgentHooks]] = {}

    def __call__(self, env: Env, task: Task, obs: Observation, history: list[Step]) -> str:
        key = id(env)
        cur = self.hooks.get(key)
        if cur is None or cur[0] != task.id or not history:
            cur = (task.id, self.factory())
            cur[1].on_episode_start(task, obs)
            self.hooks[key] = cur
        return cur[1].retrieve(obs, history).prompt_text()


def _make_teacher(cfg: TrainConfig, mode: str, model: Any, tokenizer: Any, store: Any) -> Teacher:
    op = cfg.on_policy
    if mode == "self":
        return SelfTeacher(
            model, tokenizer, weights=op.teacher_weights, max_new_tokens=op.max_new_tokens, temperature=0.0
        )
    if mode == "local":
        if not cfg.teacher:
            raise TrainError(
                f"method {cfg.method!r} with a local teacher needs 'teacher': a local HF model dir sharing "
                "the student's tokenizer (or set on_policy.teacher_url for an API teacher)"
            )
        if not Path(cfg.teacher).expanduser().exists():
            raise TrainError(
                f"teacher model path {cfg.teacher!r} does not exist; point 'teacher' at a model dir"
            )
        dtype = "bfloat16" if _use_bf16(cfg.dtype) else "float32"
        try:
            return LocalTeacher.load(
                cfg.teacher, tokenizer, student=cfg.student, dtype=dtype, max_new_tokens=op.max_new_tokens
            )
        except TeacherError as e:
            raise TrainError(str(e)) from None
    if not (op.teacher_url and op.teacher_model):
        raise TrainError(
            "an API teacher needs on_policy.teacher_url and on_policy.teacher_model "
            "(an OpenAI-compatible server; scoring needs vLLM's prompt_logprobs)"
        )
    t = APITeacher(
        op.teacher_model,
        base_url=op.teacher_url,
        tokenizer=tokenizer,
        api_key_env=op.api_key_env,
        top_k=op.top_k,
        store=store,
        max_new_tokens=op.max_new_tokens,
    )
    if mode == "api":
        try:
            t.self_test()
        except TeacherError as e:
            raise TrainError(str(e)) from None
    return t


# --------------------------------------------------------------------------- the loss module


def _loss_module(model: Any, loss: Any, chunk_size: int) -> Any:
    """``model`` inside a module whose forward is (summed loss of the rows, summed CE of the aux rows).

    The aux rows are pi-Distill's privileged-view CE on gold actions; DDP sees one forward.
    """
    import torch

    from evolve.train.losses import make_loss
    from evolve.train.losses.base import Target, chunked_loss

    ce = make_loss("ce")

    class OnPolicyLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def _hidden(self, ids: Any, mask: Any) -> Any:
            lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            return lm, lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

        def forward(
            self,
            input_ids: Any,
            labels: Any,
            attention_mask: Any,
            target: dict[str, Any],
            aux: dict[str, Any] | None = None,
        ) -> tuple[Any, Any]:
            lm, hidden = self._hidden(input_ids, attention_mask)
            head = lm.get_output_embeddings()
            keep = labels[:, 1:] != IGNORE_INDEX
            main = chunked_loss(
                loss,
                hidden[:, :-1][keep],
                head.weight,
                Target(labels=labels[:, 1:][keep], **target),
                bias=head.bias,
                chunk_size=chunk_size,
            )
            extra = main.new_zeros(())
            if aux is not None:
                _, h2 = self._hidden(aux["input_ids"], aux["attention_mask"])
                keep2 = aux["labels"][:, 1:] != IGNORE_INDEX
                extra = chunked_loss(
                    ce,
                    h2[:, :-1][keep2],
                    head.weight,
                    Target(labels=aux["labels"][:, 1:][keep2]),
                    bias=head.bias,
                    chunk_size=chunk_size,
                )
            return main, extra

    return OnPolicyLoss()


# --------------------------------------------------------------------------- rows


class _Row:
    """One supervised turn: student ids/labels, the teacher's prompt, and the teacher's answer later."""

    def __init__(self, turn: Turn, teacher_prompt: list[int]) -> None:
        self.turn = turn
        self.ids = [*turn.prompt_ids, *turn.token_ids]
        self.labels = [IGNORE_INDEX] * len(turn.prompt_ids) + list(turn.token_ids)
        self.teacher_prompt = teacher_prompt
        self.scored: Any = None


def _batch(rows: Sequence[_Row], pad: int, device: Any) -> dict[str, Any]:
    import torch

    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
        mask[i, : len(r.ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def _target(rows: Sequence[_Row], teacher: Teacher | None, device: Any) -> dict[str, Any]:
    """The teacher's fields for the rows' trained tokens, concatenated in row order (the loss's order)."""
    import torch

    if teacher is None:
        return {}
    if teacher.kind == "full":
        return {
            "teacher_hidden": torch.cat([r.scored.hidden for r in rows]).to(device),
            "teacher_weight": teacher.output_weight().to(device),
        }
    k = max(r.scored.topk_ids.shape[1] for r in rows)

    def padk(x: Any, fill: float) -> Any:
        return torch.nn.functional.pad(x, (0, k - x.shape[1]), value=fill)

    return {
        "topk_ids": torch.cat([padk(r.scored.topk_ids, 0) for r in rows]).to(device),
        "topk_logprobs": torch.cat([padk(r.scored.topk_logprobs, float("-inf")) for r in rows]).to(device),
        "tail_logprob": torch.cat([r.scored.tail_logprob for r in rows]).to(device),
    }


def _micro_batches(rows: Sequence[_Row], max_tokens: int) -> list[list[_Row]]:
    """Rows grouped so that rows x longest row <= max_tokens (at least one row per batch)."""
    out: list[list[_Row]] = []
    cur: list[_Row] = []
    for r in sorted(rows, key=lambda r: -len(r.ids)):
        width = max([len(x.ids) for x in cur] + [len(r.ids)])
        if cur and width * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


def _aux_rows(cfg: TrainConfig, turns: Sequence[Turn], tokenizer: Any) -> list[_Row]:
    """pi-Distill: the privileged view answering the env's next gold action (CE rows)."""
    fmt = cfg.on_policy.action_format
    rows = []
    for t in turns:
        if not t.gold:
            continue
        view = add_privileged(t.messages, t.privileged)
        prompt = hf.chat_prompt_ids(tokenizer, view)
        answer = answer_ids(tokenizer, view, answer_text(Action(text=t.gold), fmt))
        fake = Turn(
            episode=t.episode, step=t.step, messages=view, prompt_ids=prompt, token_ids=answer,
            logprobs=[], text="", action=t.gold, parsed=True,
        )  # fmt: skip
        if len(prompt) + len(answer) <= cfg.max_length:
            rows.append(_Row(fake, prompt))
    return rows


# --------------------------------------------------------------------------- the loop


def train_on_policy(
    config: TrainConfig,
    env: EnvSpec,
    store: Any,
    *,
    tasks: Sequence[Task] | None = None,
    namespace: str | None = None,
    run_id: str | None = None,
    hooks: HooksFactory | None = None,
    knowledge_hooks: HooksFactory | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``config.student`` on its own rollouts in ``env`` (see the module docstring).

    ``tasks`` default to the env's ``on_policy.split``. ``hooks`` (optional) builds the memory shown
    in the student's own prompts; ``knowledge_hooks`` builds the memory whose retrievals are
    Skill-SD's privileged context (required for ``skill_sd``). Episodes are recorded to ``store``
    under ``namespace`` / ``run_id``. Returns the same :class:`TrainResult` as SFT, with per-step
    rollout statistics in ``on_policy_stats``.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import get_scheduler

    from evolve.train.losses import make_loss

    cfg, op = config, config.on_policy
    if cfg.method not in ON_POLICY_METHODS:
        raise TrainError(f"train_on_policy runs {', '.join(ON_POLICY_METHODS)}; got method {cfg.method!r}")
    if cfg.method == "skill_sd" and knowledge_hooks is None:
        raise TrainError("method 'skill_sd' needs the store's skills: run it from a job with a distill stage")
    out = Path(cfg.output_dir)
    started = time.monotonic()
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision="bf16" if _use_bf16(cfg.dtype) else "no",
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=False)
        ],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1:
        raise TrainError(
            f"on-policy methods run in one process ({world} were launched): the rollouts are recorded to "
            "one store file, which takes one writer; run without accelerate launch / torchrun"
        )
    set_seed(cfg.seed)

    # 1. student, teacher, loss -------------------------------------------------------------------
    mode = teacher_mode(cfg)
    if mode == "sampled" and op.mix <= 0:
        raise TrainError("teacher_mode 'sampled' trains on teacher-written turns only: set on_policy.mix > 0")
    model, tokenizer = _load_student(cfg)
    chat_template = tokenizer.chat_template
    model = _prepare_model(model, cfg)
    # sampled: the API only writes turns (no scoring); otherwise the teacher scores (and may write) turns
    teacher: Teacher | None = None if mode == "sampled" else _make_teacher(cfg, mode, model, tokenizer, store)
    teacher_actor = _make_teacher(cfg, "sampled", model, tokenizer, store) if mode == "sampled" else teacher
    loss_name = default_loss(cfg, teacher.kind if teacher is not None else "none")
    loss_fn = make_loss(loss_name, **cfg.loss_args)
    wants = set(loss_fn.needs)
    if teacher is not None and teacher.kind == "topk" and "teacher_logits" in wants:
        raise TrainError(
            f"loss {loss_name!r} needs full teacher logits; an API teacher gives top-k log-probs: "
            "use topk_forward_kl"
        )
    scores_needed = bool(wants - {"labels"}) and teacher is not None
    model.train()
    student = _loss_module(model, loss_fn, cfg.chunk_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    sched_name = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    device = accelerator.device
    inner = accelerator.unwrap_model(student).model  # the live model the rollouts use

    # 2. envs and tasks ------------------------------------------------------------------------------
    envs = [build_env(env) for _ in range(op.envs)]
    try:
        pool = list(tasks) if tasks is not None else envs[0].tasks(Split(op.split))
        if not pool:
            raise TrainError(f"no tasks in split {op.split!r} of env {env.name!r}; set on_policy.split")
        order = list(pool)
        random.Random(cfg.seed).shuffle(order)
        privileged = None
        if cfg.method in ("opsd", "pi_distill"):
            privileged = gold_context
        elif cfg.method == "skill_sd":
            assert knowledge_hooks is not None
            privileged = _MemoryContexts(knowledge_hooks)
        prompt_opts = PromptOptions(action_format=op.action_format)
        recorder = Recorder(store, namespace=namespace or store.namespace, run_id=run_id)

        # 3. resume ----------------------------------------------------------------------------------
        fingerprint = _fingerprint(cfg, env, [t.id for t in order])
        ckpt_root = out / "checkpoints"
        if not cfg.resume and accelerator.is_main_process and ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        accelerator.wait_for_everyone()
        state: dict[str, Any] = {
            "step": 0, "losses": [], "eval_losses": [], "tokens": 0, "trained_tokens": 0, "stats": [],
        }  # fmt: skip
        resumed_from, last_ckpt = None, None
        if cfg.resume:
            found = _latest_valid_checkpoint(ckpt_root)
            if found is not None:
                state = _load_checkpoint(found, accelerator, student, optimizer, scheduler, fingerprint)
                resumed_from, last_ckpt = state["step"], found

        # 4. the steps -------------------------------------------------------------------------------
        bar = _Progress(total_steps, state["step"], enabled=progress and accelerator.is_main_process)
        run_tokens, run_started = 0, time.monotonic()
        pad = hf.pad_id(tokenizer)
        episodes: set[str] = set(state.get("episodes", []))
        for step in range(state["step"], total_steps):
            t0 = time.monotonic()
            # (a) roll out this process's share of the step's episodes
            first = (step * world + rank) * op.envs
            step_tasks = [order[(first + i) % len(order)] for i in range(op.envs)]
            depth = depth_at(cfg, step, total_steps)
            hook_objs = [hooks() for _ in envs] if hooks is not None else None
            rolls: list[Rollout] = rollout(
                inner,
                tokenizer,
                envs,
                step_tasks,
                recorder,
                max_turns=depth,
                temperature=op.temperature,
                top_p=op.top_p,
                max_new_tokens=op.max_new_tokens,
                seed=cfg.seed * 1_000_003 + step * world + rank,
                prompt=prompt_opts,
                hooks=hook_objs,
                privileged=privileged,
                teacher_act=teacher_actor.act if op.mix > 0 and teacher_actor is not None else None,
                mix=op.mix,
                gold=cfg.method == "pi_distill",
                policy_name=f"student:{cfg.method}",
            )
            episodes.update(r.trajectory_id for r in rolls)
            t_roll = time.monotonic() - t0

            # (b) the supervised turns, in the student's and the teacher's view
            turns = [t for r in rolls for t in r.turns]
            if op.supervise == "parsed":
                turns = [t for t in turns if t.parsed]
            if mode == "sampled":
                turns = [t for t in turns if t.source == "teacher"]
            rows = []
            for t in turns:
                if not t.token_ids or len(t.prompt_ids) + len(t.token_ids) > cfg.max_length:
                    continue
                tp = t.prompt_ids
                if mode == "self" and t.privileged:
                    tp = hf.chat_prompt_ids(tokenizer, add_privileged(t.messages, t.privileged))
                rows.append(_Row(t, tp))
            aux_rows = _aux_rows(cfg, turns, tokenizer) if cfg.method == "pi_distill" else []

            # (c) the teacher's view of the student's tokens
            t1 = time.monotonic()
            if scores_needed and rows:
                assert teacher is not None
                scored = teacher.score([r.teacher_prompt for r in rows], [r.turn.token_ids for r in rows])
                for r, s in zip(rows, scored, strict=True):
                    r.scored = s
            t_teacher = time.monotonic() - t1

            # (d) one optimizer step over all rows, normalised by the global trained-token count
            local = torch.tensor(
                [sum(len(r.turn.token_ids) for r in rows), sum(len(r.turn.token_ids) for r in aux_rows),
                 sum(len(r.ids) for r in rows)], device=device,
            )  # fmt: skip
            n_trained, n_aux, n_tokens = (int(x) for x in accelerator.reduce(local, "sum").tolist())
            batches = _micro_batches(rows, cfg.max_tokens_per_batch)
            aux_batches = _micro_batches(aux_rows, cfg.max_tokens_per_batch)
            n_micro = max(len(batches), len(aux_batches), 1)
            counts = accelerator.reduce(torch.tensor([n_micro], device=device), "max")
            n_micro = int(counts.item())
            loss_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            try:
                for i in range(n_micro):
                    b = batches[i] if i < len(batches) else (batches[:1] or [None])[0]
                    w = 1.0 if i < len(batches) else 0.0
                    ab = aux_batches[i] if i < len(aux_batches) else None
                    sync = i == n_micro - 1
                    if b is None:  # no turn at all this step on this process: a zero-weight dummy row
                        b, w = [_dummy_row(tokenizer)], 0.0
                    inputs = _batch(b, pad, device)
                    target = _target(b, teacher, device) if scores_needed and w else {}
                    if scores_needed and not w:
                        target = _dummy_target(b, teacher, device, inputs)
                    aux = _batch(ab, pad, device) if ab else None
                    ctx = accelerator.no_sync(student) if not sync else nullcontext()
                    with ctx:
                        with accelerator.autocast():
                            main, extra = student(**inputs, target=target, aux=aux)
                        total = main * (w * world / max(1, n_trained))
                        if aux is not None and n_aux:
                            total = total + extra * (op.pi_weight * world / n_aux)
                        accelerator.backward(total)
                    loss_sum += main.detach().float() * w
                    aux_sum += extra.detach().float()
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
            n_ok = sum(r.success for r in rolls)
            stats = {
                "step": step + 1,
                "depth": depth,
                "episodes": len(rolls),
                "successes": n_ok,
                "turns": sum(len(r.turns) for r in rolls),
                "trained_turns": len(rows),
                "teacher_turns": sum(t.source == "teacher" for r in rolls for t in r.turns),
                "parsed": sum(t.parsed for r in rolls for t in r.turns),
                "rollout_s": round(t_roll, 3),
                "teacher_s": round(t_teacher, 3),
                "generated_tokens": sum(
                    len(t.token_ids) for r in rolls for t in r.turns if t.source == "student"
                ),
                "aux_loss": float(accelerator.reduce(aux_sum, "sum")) / max(1, n_aux) if n_aux else None,
            }
            state["step"] = step + 1
            state["losses"].append(step_loss)
            state["stats"].append(stats)
            state["tokens"] += n_tokens
            state["trained_tokens"] += n_trained
            state["episodes"] = sorted(episodes)
            run_tokens += n_tokens
            done = step + 1 == total_steps
            if cfg.save_every and ((step + 1) % cfg.save_every == 0 or done):
                state["fingerprint"] = fingerprint
                last_ckpt = _save_checkpoint(
                    ckpt_root,
                    step + 1,
                    accelerator,
                    student,
                    optimizer,
                    scheduler,
                    state,
                    cfg.keep_checkpoints,
                )
            bar.update(step + 1, step_loss, run_tokens / max(1e-9, time.monotonic() - run_started))
            if on_step is not None:
                on_step(step + 1, step_loss)
        bar.close()
        run_s = time.monotonic() - run_started
    finally:
        for e in envs:
            e.close()

    # 5. save ------------------------------------------------------------------------------------------
    return _finish(
        accelerator, student, tokenizer, chat_template, cfg, out, state,
        started=started, run_s=run_s, run_tokens=run_tokens, resumed_from=resumed_from,
        last_ckpt=last_ckpt, processes=world,
        examples=[],
        trajectories=sorted(episodes),
        loss=loss_name,
        teacher=getattr(teacher or teacher_actor, "name", None),
        on_policy_stats=state["stats"],
    )  # fmt: skip


def _dummy_row(tokenizer: Any) -> _Row:
    """A one-token row with weight 0: keeps every process's forward/backward count equal under DDP."""
    eos = tokenizer.eos_token_id or 0
    t = Turn(episode=0, step=0, messages=[], prompt_ids=[eos], token_ids=[eos], logprobs=[], text="",
             action="", parsed=False)  # fmt: skip
    return _Row(t, [eos])


def _dummy_target(rows: Sequence[_Row], teacher: Teacher | None, device: Any, inputs: dict[str, Any]) -> dict:
    """Zero-weight stand-ins for the teacher's fields (the row's loss is multiplied by 0)."""
    import torch

    n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    if teacher is None:
        return {}
    if teacher.kind == "full":
        w = teacher.output_weight().to(device)
        return {
            "teacher_hidden": torch.zeros((n, w.shape[1]), device=device, dtype=w.dtype),
            "teacher_weight": w,
        }
    return {
        "topk_ids": torch.zeros((n, 1), dtype=torch.long, device=device),
        "topk_logprobs": torch.zeros((n, 1), device=device),
        "tail_logprob": torch.full((n,), float("-inf"), device=device),
    }


def _fingerprint(cfg: TrainConfig, env: EnvSpec, task_ids: Sequence[str]) -> str:
    """What a checkpoint must match to be resumed: the trainer's settings hash, the env and the tasks."""
    import hashlib

    h = hashlib.sha256(_settings_hash(cfg).encode())
    h.update(env.model_dump_json().encode())
    h.update("|".join(task_ids).encode())
    return h.hexdigest()[:16]


def kl_to_teacher(
    student: Any,
    teacher: Teacher,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    completions: Sequence[Sequence[int]],
    *,
    teacher_prompts: Sequence[Sequence[int]] | None = None,
) -> float:
    """Mean per-token KL(student || teacher) over fixed (prompt, completion) pairs: a held-out measure.

    ``teacher_prompts`` (token ids) give the teacher its own view (privileged); default the student's.
    """
    import torch
    import torch.nn.functional as F

    from evolve.train.teachers import _hidden_rows

    s_prompts = [hf.chat_prompt_ids(tokenizer, m) for m in prompts]
    t_prompts = list(teacher_prompts) if teacher_prompts is not None else s_prompts
    s_rows = _hidden_rows(student, s_prompts, completions, 8)
    scored = teacher.score(t_prompts, completions)
    lm = student.get_base_model() if hasattr(student, "get_base_model") else student
    w_s = lm.get_output_embeddings().weight.detach()
    total, n = 0.0, 0
    with torch.no_grad():
        for h, sc in zip(s_rows, scored, strict=True):
            log_s = F.log_softmax((h @ w_s.T).float(), -1)
            if teacher.kind == "full":
                log_t = F.log_softmax((sc.hidden @ teacher.output_weight().T).float(), -1)
                total += float(F.kl_div(log_t, log_s, reduction="sum", log_target=True))
            else:  # top-k: KL over the teacher's k ids + tail (forward direction, what the loss uses)
                from evolve.train.losses.base import Target
                from evolve.train.losses.topk_forward_kl import TopKForwardKL

                tgt = Target(labels=torch.zeros(h.shape[0], dtype=torch.long), topk_ids=sc.topk_ids,
                             topk_logprobs=sc.topk_logprobs, tail_logprob=sc.tail_logprob)  # fmt: skip
                total += float(TopKForwardKL().per_token((h @ w_s.T).float(), tgt).sum())
            n += h.shape[0]
    return total / max(1, n)


__all__ = ["default_loss", "depth_at", "gold_context", "kl_to_teacher", "teacher_mode", "train_on_policy"]
