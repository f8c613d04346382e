"""Privileged self-distillation with a real model: does OPSD / pi-Distill raise the gold action's
probability when the privileged block is *not* shown?

The student is Qwen2.5-Coder-0.5B-Instruct (the HF checkpoint made from its GGUF). The measure is
taken at the states along the oracle's path of TextWorld games, in the agent's own prompt layout:
the mean log-probability per token, and the summed log-probability of the gold answer (the JSON
answer naming the env's next winning command), with and without the privileged block (the env's
winning commands from here, its gold path and win facts). Train games are the games OPSD rolls out
in; held-out games are never seen in training. Rows: the student before training, then after
``--steps`` OPSD steps (LoRA, the student's own rollouts, its privileged view at the start of
training as the teacher, reverse KL), and, with ``--methods opsd pi_distill``, after pi-Distill too.

    python bench/local_llm.py hf --model qwen2.5-coder-0.5b
    python bench/distill.py logprob --steps 6 --threads 2   # results in bench/results/distill/
    python bench/distill.py table --rows teacher,before,sft,opsd   # the student table (student_table.py)

Each method's training is resumable (its own output dir with checkpoints); the table is rebuilt from
what is on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402
from rich.console import Console  # noqa: E402

MODELS_DIR = Path(os.environ.get("EVOLVE_MODELS_DIR", Path.home() / ".cache" / "evolve" / "models"))


def oracle_states(env_spec: Any, split: str, n_games: int, n_turns: int) -> list[tuple[list, list, str]]:
    """(plain prompt, privileged prompt, gold command) at states on the oracle's path."""
    from evolve.agents.rollout import next_gold
    from evolve.envs import build_env
    from evolve.llm.prompts import PromptOptions, add_privileged, build_messages
    from evolve.schema import Action, Step
    from evolve.train.onpolicy import gold_context

    env = build_env(env_spec)
    out = []
    try:
        for task in env.tasks(split)[:n_games]:
            obs, history = env.reset(task), []
            for _ in range(n_turns):
                gold = next_gold(env)
                if gold is None:
                    break
                plain = build_messages(task.goal, obs, history, None, PromptOptions(action_format="json"))
                out.append((plain, add_privileged(plain, gold_context(env, task, obs, history)), gold))
                post = env.step(gold)
                history = [
                    *history,
                    Step(index=len(history), pre_state=obs, action=Action(text=gold), post_state=post),
                ]
                obs = post
                if obs.done:
                    break
    finally:
        env.close()
    return out


def gold_scores(model: Any, tok: Any, states: list[tuple[list, list, str]]) -> dict[str, float]:
    from evolve.llm import hf
    from evolve.llm.prompts import answer_text
    from evolve.schema import Action
    from evolve.train.teachers import answer_ids

    res: dict[str, float] = {}
    for view, idx in (("plain", 0), ("privileged", 1)):
        prompts = [hf.chat_prompt_ids(tok, s[idx]) for s in states]
        answers = [answer_ids(tok, s[idx], answer_text(Action(text=s[2]), "json")) for s in states]
        rows = hf.score(model, tok, prompts, answers, batch_size=2)
        res[f"{view}_per_token"] = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
        res[f"{view}_per_answer"] = sum(sum(r) for r in rows) / len(rows)
    return res


def logprob_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--methods", nargs="+", default=["opsd"], choices=["opsd", "pi_distill"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--envs", type=int, default=2)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--games", type=int, default=4, help="games per split for the measure")
    p.add_argument("--turns", type=int, default=4, help="oracle states per game for the measure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/distill")


def logprob_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from evolve.llm import hf
    from evolve.specs import EnvSpec
    from evolve.stores import ExperienceStore
    from evolve.train.onpolicy import train_on_policy
    from evolve.train.trainer import LoraSettings, OnPolicySettings, TrainConfig

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = MODELS_DIR / f"{args.model}-hf"
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir} is missing: run `python bench/local_llm.py hf --model {args.model}` first")
    env = EnvSpec(name="textworld", kwargs={"n_train": 8, "n_dev": 4, "n_test": args.games})
    states = {
        "train games": oracle_states(env, "train", args.games, args.turns),
        "held-out games": oracle_states(env, "test", args.games, args.turns),
    }
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}

    def measure(label: str, path: Path, extra: dict[str, Any]) -> None:
        if label in results:
            return
        model, tok = hf.load_causal_lm(path, device="cpu", dtype="float32")
        t0 = time.perf_counter()
        results[label] = {k: gold_scores(model, tok, v) for k, v in states.items()} | extra
        results[label]["measure_s"] = time.perf_counter() - t0
        results_path.write_text(json.dumps(results, indent=1))
        del model

    measure("before", model_dir, {})
    for method in args.methods:
        label = f"after {method}"
        if label in results:
            continue
        cfg = TrainConfig(
            student=str(model_dir),
            output_dir=str(out / f"train-{method}"),
            method=method,
            lora=LoraSettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            lr=args.lr,
            schedule="constant",
            max_steps=args.steps,
            max_length=4096,
            max_tokens_per_batch=4096,
            dtype="float32",
            save_every=1,
            on_policy=OnPolicySettings(
                envs=args.envs, max_turns=args.max_turns, max_new_tokens=48, temperature=1.0
            ),
        )
        console.print(f"[cyan]{method}[/]: {args.steps} steps x {args.envs} episodes ...")
        with ExperienceStore(out / "store.duckdb", namespace="distill", embedder="hash") as store:
            r = train_on_policy(cfg, env, store, run_id=method)
        extra = {
            "train": {
                "steps": r.steps, "losses": r.losses, "wall_s": r.wall_s, "tokens": r.tokens,
                "trained_tokens": r.trained_tokens, "peak_rss_mb": r.peak_rss_mb,
                "episodes": len(r.trajectories), "stats": r.on_policy_stats,
            }
        }  # fmt: skip
        measure(label, Path(r.merged_dir), extra)

    rows = []
    for label, res in results.items():
        for where in states:
            s = res[where]
            rows.append(
                [label, where, len(states[where]), s["plain_per_token"], s["plain_per_answer"],
                 s["privileged_per_token"], s["privileged_per_answer"],
                 res.get("train", {}).get("wall_s"), res.get("train", {}).get("peak_rss_mb", 0) / 1024 or None]
            )  # fmt: skip
    md = print_table(
        f"Gold-action log-prob of {args.model} at oracle states (TextWorld), without and with the privileged "
        f"block; OPSD/pi-Distill: {args.steps} steps x {args.envs} episodes, LoRA r=16, lr {args.lr}",
        ["model", "states of", "n", "plain /token", "plain /answer", "privileged /token", "privileged /answer",
         "train s", "train peak RSS GB"],
        rows,
        console=console,
    )  # fmt: skip
    (out / "table.md").write_text(md + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    logprob_args(sub.add_parser("logprob", help="gold-action log-prob at oracle states, before/after OPSD"))
    from student_table import table_args

    table_args(sub.add_parser("table", help="the student table: success of each row, without/with memory"))
    args = p.parse_args(argv)
    if args.part == "logprob":
        logprob_main(args)
    else:
        from student_table import table_main

        table_main(args)


if __name__ == "__main__":
    main()
