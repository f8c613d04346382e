"""Training speed, evolve vs TRL side by side on the same agent data: SFT (``--mode sft``, vs
SFTTrainer) and on-policy distillation (``--mode opd``, vs DistillationTrainer and GKDTrainer).

**SFT.**
Same model, data, order, sequence length, batch (1 example x ``--accum`` micro-batches), LoRA
(r=16, alpha 32, on the attention projections), learning rate, optimizer steps and threads; each
framework runs in its own process so that its peak RSS is its own. The data are real agent steps:
oracle episodes on TextWorld train games, rendered by ``evolve.synth.sft_examples`` through the
policies' prompt layout (one example per acted step; the answer is the only trained message), and
exported for TRL with ``evolve.train.data.to_trl_dataset`` (conversational prompt-completion, which
SFTTrainer trains on the completion only).

    python bench/local_llm.py hf --model qwen2.5-coder-0.5b            # once: the HF checkpoint
    python bench/train_speed.py --model tiny                              # a few seconds per run
    python bench/train_speed.py --model qwen2.5-coder-0.5b --steps 4      # ~10 min on 1 thread

tokens/s counts input tokens (prompt + answer) of the optimizer steps, timed from the first step to
the last (model loading and tokenisation excluded for both). Losses are per optimizer step, each the
mean per trained token over its accumulated batch.

**On-policy distillation** (``--mode opd``): the student (Qwen2.5-Coder-0.5B, LoRA as above) samples
answers to the first-turn prompts of TextWorld train games (the agent's real prompt layout), the
teacher (Qwen2.5-Coder-1.5B, same tokenizer) scores them with full logits, the loss is the reverse KL
(TRL: ``beta=1``, its generalized JSD at the reverse-KL end; GKD with ``lmbda=1``, fully on-policy).
TRL has no environment loop, so the prompts are single-turn for all three; evolve rolls them as
1-turn episodes in the real env (``max_turns=1``). Same prompts, batch (``--batch`` prompts per
step), generation length, temperature 1, steps, LoRA, learning rate, threads. tokens/s = (prompt +
generated tokens) / wall time of the steps (generation + teacher + update); teacher s = time inside
the teacher's forward passes (a forward hook for TRL, evolve's own per-step timing).

    python bench/local_llm.py hf --model qwen2.5-coder-1.5b            # once: the teacher checkpoint
    python bench/train_speed.py --mode opd --model qwen2.5-coder-0.5b --steps 3 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from rich.console import Console  # noqa: E402

MODELS_DIR = Path(os.environ.get("EVOLVE_MODELS_DIR", Path.home() / ".cache" / "evolve" / "models"))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# --------------------------------------------------------------------------- data + models


def agent_examples(out: Path, n_games: int, seed: int) -> list[Any]:
    """Per-step SFT examples from oracle episodes on TextWorld train games (cached as JSONL)."""
    from evolve.schema import TrainingExample

    cache = out / "examples.jsonl"
    if cache.exists():
        return [TrainingExample.model_validate_json(line) for line in cache.read_text().splitlines()]
    from evolve.agents.collect import collect
    from evolve.synth import sft_examples

    trajs = collect(
        {"name": "textworld", "kwargs": {}},
        {"kind": "oracle"},
        split="train",
        n_episodes=n_games,
        max_steps=40,
        seed=seed,
        progress=False,
    )
    examples = sft_examples(trajs, namespace="bench")
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text("".join(e.model_dump_json() + "\n" for e in examples))
    return examples


def model_dir(name: str, out: Path) -> Path:
    """The HF checkpoint to train: the 0.5B made from its GGUF, or a tiny Qwen2 config model with
    the real Qwen2.5 tokenizer (same vocabulary and chat template, tiny layers)."""
    qwen = MODELS_DIR / "qwen2.5-coder-0.5b-hf"
    if name == "qwen2.5-coder-0.5b":
        if not (qwen / "config.json").is_file():
            sys.exit(
                f"{qwen} is missing: run `python bench/local_llm.py hf --model qwen2.5-coder-0.5b` first"
            )
        return qwen
    tiny = out / "tiny-qwen2"
    if (tiny / "config.json").is_file():
        return tiny
    if not (qwen / "tokenizer_config.json").is_file():
        sys.exit(
            "the tiny model borrows Qwen2.5's tokenizer: run `python bench/local_llm.py hf --model qwen2.5-coder-0.5b`"
        )
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(qwen), local_files_only=True)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(str(tiny))
    tok.save_pretrained(str(tiny))
    return tiny


def select(examples: list[Any], tokenizer: Any, n: int, max_length: int, seed: int) -> list[Any]:
    """``n`` examples that fit ``max_length`` untruncated, drawn at random, then longest first
    (the order both frameworks see: evolve's unshuffled batches are longest first)."""
    from evolve.train.data import tokenize_example

    fits = []
    for e in examples:
        t = tokenize_example(tokenizer, e, max_length=10**6)
        if t is not None and len(t.input_ids) <= max_length:
            fits.append((len(t.input_ids), t.n_trained, e))
    random.Random(seed).shuffle(fits)
    chosen = fits[:n]
    chosen.sort(key=lambda x: -x[0])
    return [e for _, _, e in chosen]


# --------------------------------------------------------------------------- one framework per process


def run_evolve(args: argparse.Namespace, examples: list[Any]) -> dict[str, Any]:
    from evolve.train.trainer import LoraSettings, TrainConfig, train

    cfg = TrainConfig(
        student=args.model_dir,
        output_dir=str(Path(args.work) / "evolve"),
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS),
        lr=args.lr,
        schedule="constant",
        max_steps=args.steps,
        grad_accum=args.accum,
        max_tokens_per_batch=1,  # one example per micro-batch, as TRL's batch size 1
        shuffle=False,
        max_length=args.max_length,
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        dtype="float32",
        resume=False,
        save_merged=False,
        seed=0,
    )
    r = train(cfg, examples, progress=False)
    return {
        "losses": r.losses,
        "tokens": r.tokens,
        "trained_tokens": r.trained_tokens,
        "tokens_per_s": r.tokens_per_s,
    }


def run_trl(args: argparse.Namespace, examples: list[Any]) -> dict[str, Any]:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from evolve.train.data import to_trl_dataset

    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype="float32")
    if args.trl_data == "chat":  # what a TRL user writes: conversational prompt-completion
        ds = to_trl_dataset(examples, "sft").remove_columns(["id"])
    else:  # the very tokens and masks evolve trains on (SFTTrainer takes tokenized data as is)
        import datasets

        from evolve.train.data import tokenize_example

        rows = []
        for e in examples:
            t = tokenize_example(tok, e, max_length=args.max_length)
            rows.append({"input_ids": t.input_ids, "completion_mask": [int(x != -100) for x in t.labels]})
        ds = datasets.Dataset.from_list(rows)
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            times.setdefault("t0", time.perf_counter())

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["t1"] = time.perf_counter()

    cfg = SFTConfig(
        output_dir=str(Path(args.work) / "trl"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=args.accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=args.max_length,
        completion_only_loss=True,
        packing=False,
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        gradient_checkpointing=args.gradient_checkpointing == "on",  # TRL's default is on: set it alike
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[Clock()]
    )
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][: args.steps * args.accum])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    secs = times["t1"] - times["t0"]
    return {"losses": losses, "tokens": tokens, "tokens_per_s": tokens / secs}


# --------------------------------------------------------------------------- on-policy distillation


def first_turn_prompts(n: int) -> tuple[list[Any], list[list[dict[str, str]]]]:
    """The first ``n`` TextWorld train games and their first-turn prompts (the agent's layout)."""
    from evolve.envs import build_env
    from evolve.llm.prompts import PromptOptions, build_messages
    from evolve.schema import Split

    env = build_env({"name": "textworld", "kwargs": {}})
    try:
        tasks = env.tasks(Split.train)[:n]
        prompts = []
        for t in tasks:
            obs = env.reset(t)
            prompts.append(
                build_messages(t.goal or obs.goal, obs, [], None, PromptOptions(action_format="json"))
            )
    finally:
        env.close()
    return tasks, prompts


class TeacherClock:
    """Seconds spent inside a module's forward passes (pre/post forward hooks)."""

    def __init__(self, module: Any) -> None:
        self.total, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(lambda *a: setattr(self, "_t0", time.perf_counter()))
        module.register_forward_hook(
            lambda *a: setattr(self, "total", self.total + time.perf_counter() - self._t0)
        )


def run_evolve_opd(args: argparse.Namespace, turns: int = 1) -> dict[str, Any]:
    import tempfile

    from evolve.specs import EnvSpec
    from evolve.stores import ExperienceStore
    from evolve.train.onpolicy import train_on_policy
    from evolve.train.trainer import LoraSettings, OnPolicySettings, TrainConfig

    tasks, _ = first_turn_prompts(args.batch * args.steps)
    cfg = TrainConfig(
        student=args.model_dir,
        output_dir=str(Path(args.work) / f"evolve-opd-{turns}"),
        method="opd",
        teacher=args.teacher_dir,
        loss="reverse_kl",
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS),
        lr=args.lr,
        schedule="constant",
        max_steps=args.steps,
        max_length=4096,
        max_tokens_per_batch=10**6,  # the step's rows in one micro-batch, as TRL's batch
        max_grad_norm=1.0,
        dtype="float32",
        resume=False,
        save_merged=False,
        on_policy=OnPolicySettings(
            envs=args.batch,
            max_turns=turns,
            max_new_tokens=args.gen_len,
            temperature=1.0,
            teacher_mode="local",
        ),
    )
    with tempfile.TemporaryDirectory() as d, ExperienceStore(Path(d) / "s.duckdb", embedder="hash") as store:
        r = train_on_policy(cfg, EnvSpec(name="textworld"), store, tasks=tasks, progress=False)
    steps_s = sum(x["rollout_s"] for x in r.on_policy_stats)
    gen = sum(x["generated_tokens"] for x in r.on_policy_stats)
    return {
        "losses": r.losses,
        "tokens": r.tokens,
        "generated": gen,
        "tokens_per_s": r.tokens_per_s,
        "teacher_s": sum(x["teacher_s"] for x in r.on_policy_stats),
        "generation_s": steps_s,
    }


def run_trl_opd(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True, dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, local_files_only=True, dtype="float32")
    clock = TeacherClock(teacher.get_decoder())
    _, prompts = first_turn_prompts(args.batch * args.steps)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            times.setdefault("t0", time.perf_counter())
            times.setdefault("teacher0", clock.total)

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["t1"] = time.perf_counter()

    common = {
        "output_dir": str(Path(args.work) / f"trl-{kind}"),
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "seed": 0,
        "gradient_checkpointing": False,  # as evolve's run
        "dataloader_num_workers": 0,
    }
    if kind == "distill":
        from trl import DistillationConfig, DistillationTrainer

        cfg = DistillationConfig(
            **common, beta=1.0, temperature=1.0, max_completion_length=args.gen_len, shuffle_dataset=False
        )
        ds = datasets.Dataset.from_list([{"prompt": m} for m in prompts])
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
            peft_config=lora, callbacks=[Clock()],
        )  # fmt: skip
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        cfg = GKDConfig(
            **common, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.gen_len, max_length=4096
        )
        # GKD takes chat messages with the reference answer (unused when lmbda=1: every batch is on-policy)
        ds = datasets.Dataset.from_list(
            [
                {"messages": [*m, {"role": "assistant", "content": '{"thought": "", "command": "look"}'}]}
                for m in prompts
            ]
        )
        trainer = GKDTrainer(
            model=model, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
            peft_config=lora, callbacks=[Clock()],
        )  # fmt: skip
    trainer.train()
    secs = times["t1"] - times["t0"]
    logs = trainer.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    prompt_tokens = sum(
        len(
            tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        for m in prompts[: args.batch * args.steps]
    )
    lens = [float(h["completions/mean_length"]) for h in logs if "completions/mean_length" in h]
    mean_len = sum(lens) / len(lens) if lens else float(args.gen_len)
    generated = round(mean_len * args.batch * args.steps)
    return {
        "losses": losses,
        "tokens": prompt_tokens + generated,
        "generated": generated,
        "generated_measured": bool(lens),
        "tokens_per_s": (prompt_tokens + generated) / secs,
        "teacher_s": clock.total - times["teacher0"],
    }


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from evolve.schema import TrainingExample

    if args.mode == "opd":
        if args.framework == "evolve":
            res = run_evolve_opd(args)
        elif args.framework == "evolve-env":  # multi-turn episodes in the env: evolve's own case
            res = run_evolve_opd(args, turns=args.turns)
        else:
            res = run_trl_opd(args, args.framework[4:])
    else:
        examples = [TrainingExample.model_validate_json(x) for x in Path(args.data).read_text().splitlines()]
        res = run_evolve(args, examples) if args.framework == "evolve" else run_trl(args, examples)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json_out).write_text(json.dumps(res))


# --------------------------------------------------------------------------- parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="sft", choices=["sft", "opd"])
    p.add_argument("--model", default="tiny", choices=["tiny", "qwen2.5-coder-0.5b"])
    p.add_argument(
        "--teacher", default="qwen2.5-coder-1.5b", help="opd: the teacher (an HF dir under the models dir)"
    )
    p.add_argument("--batch", type=int, default=4, help="opd: prompts per step")
    p.add_argument("--gen-len", type=int, default=32, help="opd: generated tokens per answer (at most)")
    p.add_argument("--turns", type=int, default=4, help="opd, evolve-env: turns per episode")
    p.add_argument("--resume", action="store_true", help="opd: reuse frameworks already measured in --out")
    p.add_argument("--out", default="runs/train_speed")
    p.add_argument("--games", type=int, default=10, help="oracle episodes the examples come from")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--frameworks", nargs="+", help="sft: trl evolve (default); opd: trl-distill trl-gkd evolve"
    )
    p.add_argument(
        "--gradient-checkpointing",
        default="off",
        choices=["off", "on"],
        help="for both frameworks alike (TRL's SFTConfig turns it on by default)",
    )
    p.add_argument(
        "--trl-data",
        default="tokens",
        choices=["tokens", "chat"],
        help="tokens: TRL gets evolve's token ids and masks (same tokens, comparable losses); "
        "chat: TRL's own conversational prompt-completion rendering (it also trains the newline after <|im_end|>)",
    )
    p.add_argument("--seed", type=int, default=0)
    # internal: one framework in a child process
    p.add_argument("--framework", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.framework:
        child(args)
        return

    from transformers import AutoTokenizer

    console = Console()
    out = Path(args.out)
    mdir = model_dir(args.model, out)
    if args.mode == "opd":
        opd_parent(args, console, out, mdir)
        return
    tok = AutoTokenizer.from_pretrained(str(mdir), local_files_only=True)
    examples = select(
        agent_examples(out, args.games, args.seed), tok, args.steps * args.accum, args.max_length, args.seed
    )
    if len(examples) < args.steps * args.accum:
        sys.exit(
            f"only {len(examples)} examples fit --max-length {args.max_length}; lower --steps or raise it"
        )
    data = out / f"selected-{args.model}.jsonl"
    data.write_text("".join(e.model_dump_json() + "\n" for e in examples))
    results: dict[str, dict[str, Any]] = {}
    for fw in args.frameworks or ["trl", "evolve"]:
        res_path = out / f"{args.model}-{fw}.json"
        cmd = [
            sys.executable, __file__, "--framework", fw, "--model-dir", str(mdir), "--data", str(data),
            "--work", str(out / f"work-{args.model}"), "--json-out", str(res_path),
            "--steps", str(args.steps), "--accum", str(args.accum), "--max-length", str(args.max_length),
            "--lr", str(args.lr), "--threads", str(args.threads), "--trl-data", args.trl_data,
            "--gradient-checkpointing", args.gradient_checkpointing,
        ]  # fmt: skip
        console.print(f"[cyan]{fw}[/]: {args.steps} steps x {args.accum} examples on {args.model} ...")
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        results[fw] = json.loads(res_path.read_text())
    base = results.get("trl")
    rows = []
    for fw, r in results.items():
        diff = None
        if base is not None and fw != "trl":
            n = min(len(base["losses"]), len(r["losses"]))
            diff = max(abs(a - b) for a, b in zip(base["losses"][:n], r["losses"][:n]))
        rows.append(
            [
                fw,
                args.model,
                len(r["losses"]),
                r["tokens"],
                r["tokens_per_s"],
                r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                r["peak_rss_mb"] / 1024,
                r["losses"][0],
                r["losses"][-1],
                diff,
            ]
        )
    md = print_table(
        f"SFT speed: {args.model}, LoRA r=16 (q,k,v,o), batch 1 x {args.accum}, {args.threads} thread(s), fp32, "
        f"TRL data: {args.trl_data}, gradient checkpointing {args.gradient_checkpointing}",
        ["framework", "model", "steps", "tokens", "tokens/s", "vs TRL", "peak RSS GB", "loss first", "loss last", "max |loss - TRL|"],
        rows,
        console=console,
    )  # fmt: skip
    tag = f"{args.model}-gc{args.gradient_checkpointing}"
    (out / f"{tag}.md").write_text(md + "\n")
    (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    console.print(
        "per-step losses: "
        + "; ".join(f"{fw} {[round(x, 4) for x in r['losses']]}" for fw, r in results.items())
    )


def opd_parent(args: argparse.Namespace, console: Console, out: Path, mdir: Path) -> None:
    """Run evolve's OPD and TRL's DistillationTrainer / GKDTrainer, each in its own process; print the table."""
    teacher = MODELS_DIR / f"{args.teacher}-hf" if args.model != "tiny" else mdir
    if not (teacher / "config.json").is_file():
        sys.exit(f"{teacher} is missing: run `python bench/local_llm.py hf --model {args.teacher}` first")
    frameworks = args.frameworks or ["trl-distill", "trl-gkd", "evolve", "evolve-env"]
    results: dict[str, dict[str, Any]] = {}
    out.mkdir(parents=True, exist_ok=True)
    for fw in frameworks:
        res_path = out / f"opd-{args.model}-{fw}.json"
        cmd = [
            sys.executable, __file__, "--mode", "opd", "--framework", fw, "--model-dir", str(mdir),
            "--teacher-dir", str(teacher), "--work", str(out / f"work-opd-{args.model}"),
            "--json-out", str(res_path), "--steps", str(args.steps), "--batch", str(args.batch),
            "--gen-len", str(args.gen_len), "--lr", str(args.lr), "--threads", str(args.threads),
            "--turns", str(args.turns),
        ]  # fmt: skip
        if args.resume and res_path.is_file():  # measured earlier with the same --out: reuse
            results[fw] = json.loads(res_path.read_text())
            continue
        console.print(
            f"[cyan]{fw}[/]: {args.steps} on-policy steps x {args.batch} prompts on {args.model} ..."
        )
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        results[fw] = json.loads(res_path.read_text()) | {"process_s": time.perf_counter() - t0}
    base = results.get("trl-distill")
    rows = [
        [
            fw, len(r["losses"]), r["tokens"], r["generated"], r["tokens_per_s"],
            r["tokens_per_s"] / base["tokens_per_s"] if base else None, r["teacher_s"],
            r["peak_rss_mb"] / 1024, r["losses"][0] if r["losses"] else None,
        ]
        for fw, r in results.items()
    ]  # fmt: skip
    md = print_table(
        f"On-policy distillation speed: student {args.model} (LoRA r=16 q,k,v,o) <- teacher {args.teacher}, "
        f"{args.batch} prompts/step, <= {args.gen_len} new tokens, reverse KL, {args.threads} thread(s), fp32",
        ["framework", "steps", "tokens", "generated", "tokens/s", "vs TRL Distillation", "teacher s", "peak RSS GB", "loss first"],
        rows,
        console=console,
    )  # fmt: skip
    tag = f"opd-{args.model}"
    (out / f"{tag}.md").write_text(md + "\n")
    (out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
