"""SFT speed, evolve's trainer vs TRL's SFTTrainer, side by side on the same agent data.

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


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from evolve.schema import TrainingExample

    examples = [TrainingExample.model_validate_json(x) for x in Path(args.data).read_text().splitlines()]
    res = run_evolve(args, examples) if args.framework == "evolve" else run_trl(args, examples)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.json_out).write_text(json.dumps(res))


# --------------------------------------------------------------------------- parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "qwen2.5-coder-0.5b"])
    p.add_argument("--out", default="runs/train_speed")
    p.add_argument("--games", type=int, default=10, help="oracle episodes the examples come from")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frameworks", nargs="+", default=["trl", "evolve"])
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
    for fw in args.frameworks:
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


if __name__ == "__main__":
    main()
