"""The student table (``python bench/distill.py table``): does a 0.5B student learn its 1.5B
teacher agent's behaviour, and does evolve memory on top make it beat the teacher?

Rows, on the same held-out TextWorld games and seeds:

* ``before``    Qwen2.5-Coder-0.5B-Instruct as fetched (Q4_K_M GGUF);
* ``sft``       LoRA SFT on the successful train-game trajectories of the oracle and the 1.5B teacher;
* ``sft+opd``   then on-policy distillation from the 1.5B teacher (full logits, reverse KL);
* ``opsd``      on-policy self-distillation, the env's gold path as the privileged block;
* ``skill_sd``  on-policy self-distillation, the memory's skills/guardrails as the privileged block;
* ``teacher``   Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), the teacher agent itself;
* ``oracle``    the env's walkthrough (a ceiling).

Every model row is played ``no_memory`` and ``evolve`` (skills + guardrails distilled from the
oracle's and the teacher's train-game episodes, probated on dev games with the random policy).
Students are evaluated through the policy users run: a trained checkpoint is exported to GGUF
(:func:`evolve.llm.gguf_export.export_gguf`: the base's quantised tensors kept, the LoRA-changed
ones rewritten) and served by llama.cpp, then played by the ``openai`` policy. All episodes go to
``OUT/store.duckdb`` keyed by (row:arm, task, seed): a rerun skips what is done, each training
reuses its finished output dir, and ``--rows`` picks what to run now. ``--report-only`` rebuilds
the table and plots from the store.

The store and the checkpoints are not committed, and a session may start on a fresh machine, so
what is measured is also kept where git keeps it (``bench/keep.py``): every episode in
``OUT/episodes/<run>.jsonl.gz``, the knowledge and stages beside them, and every trained row's
LoRA adapter (+ its ``result.json``) in ``OUT/adapters/<row>/``. A fresh store is filled from those
files before anything runs, and a missing merged checkpoint is rebuilt from the base and its
adapter: a row measured once is never trained or played again.

    python bench/local_llm.py fetch --model qwen2.5-coder-0.5b && python bench/local_llm.py fetch --model qwen2.5-coder-1.5b
    python bench/local_llm.py hf --model qwen2.5-coder-0.5b   # (and 1.5b for sft+opd)
    nohup python bench/distill.py table --rows teacher,before,sft,opsd > table.log 2>&1 &
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keep  # noqa: E402
from rich.console import Console  # noqa: E402

MODELS_DIR = Path(os.environ.get("EVOLVE_MODELS_DIR", Path.home() / ".cache" / "evolve" / "models"))
NS = "student-table"
ROWS = ("teacher", "before", "sft", "opsd", "sft+opd", "skill_sd", "oracle")
MODEL_ROWS = ("teacher", "before", "sft", "opsd", "sft+opd", "skill_sd")
ARMS = ("no_memory", "evolve")
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
CONSOLE = Console(width=160)


def table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run now, of {', '.join(ROWS)}")
    p.add_argument("--out", default="bench/results/distill-table")
    p.add_argument("--student", default="qwen2.5-coder-0.5b")
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b")
    p.add_argument("--n-train", type=int, default=16, help="train games (oracle + teacher episodes)")
    p.add_argument("--teacher-train", type=int, default=8, help="train games the 1.5B teacher plays")
    p.add_argument("--n-dev", type=int, default=4, help="dev games (probation of the knowledge)")
    p.add_argument("--n-test", type=int, default=20, help="held-out test games (1 seed each)")
    p.add_argument("--max-steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp / torch threads")
    p.add_argument("--sft-steps", type=int, default=24)
    p.add_argument("--sft-lr", type=float, default=2e-4)
    p.add_argument("--op-steps", type=int, default=6, help="on-policy steps (opd, opsd, skill_sd)")
    p.add_argument("--gguf-type", default="f16", choices=["f16", "q8_0", "f32"])
    p.add_argument(
        "--teacher-arms", default="no_memory", help="arms of the teacher row (no_memory,evolve: both)"
    )
    p.add_argument("--report-only", action="store_true")


# ------------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    out: Path
    store: Any
    spec: Any
    tasks: dict[str, list[Any]]
    episodes: Any
    memory: Any
    log: Any

    def model_gguf(self, name: str) -> Path:
        p = MODELS_DIR / f"{name}.gguf"
        if not p.is_file():
            sys.exit(f"{p} is missing: run `python bench/local_llm.py fetch --model {name}` first")
        return p

    def model_hf(self, name: str) -> Path:
        p = MODELS_DIR / f"{name}-hf"
        if not (p / "config.json").is_file():
            sys.exit(f"{p} is missing: run `python bench/local_llm.py hf --model {name}` first")
        return p


def setup(args: argparse.Namespace) -> Bench:
    from evolve.envs import build_env
    from evolve.eval import Episodes
    from evolve.pipeline import memory_for
    from evolve.specs import EnvSpec, PolicySpec
    from evolve.stores import ExperienceStore

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = EnvSpec(
        name="textworld", kwargs={"n_train": args.n_train, "n_dev": args.n_dev, "n_test": args.n_test}
    )
    env = build_env(spec)
    try:
        tasks = {s: env.tasks(s) for s in ("train", "dev", "test")}
    finally:
        env.close()
    store = ExperienceStore(out / "store.duckdb", namespace=NS, embedder="hash")
    episodes = Episodes(
        store,
        spec,
        PolicySpec(kind="random", seed=0),
        namespace=NS,
        seeds=(0,),
        max_steps=args.max_steps,
        workers=1,
        retry_errors=True,
        progress=sys.stderr.isatty(),
        announce=lambda arm, n, _s: print(f"  {arm}: {n} episodes to run", flush=True),
    )
    memory = memory_for(store, NS, "hash", env="textworld")
    b = Bench(args, out, store, spec, tasks, episodes, memory, lambda *m: print(*m, flush=True))
    if any((n := keep.restore(store, NS, out)).values()):
        b.log(f"  restored {n} from {out}")
    return b


# ------------------------------------------------------------- what survives a fresh machine
def _kept_adapter(b: Bench, row: str) -> Path:
    return b.out / "adapters" / row.replace("+", "-")


def _train_dir(b: Bench, row: str) -> Path:
    # opsd shares its output dir with `distill.py logprob` (same settings): trained once for both
    return Path("bench/results/distill/train-opsd") if row == "opsd" else b.out / f"train-{row}"


def save_adapter(b: Bench, row: str, out_dir: Path) -> None:
    """The row's LoRA adapter and result.json, a few MB, kept in git under OUT/adapters/ROW."""
    kept = _kept_adapter(b, row)
    if (kept / "result.json").is_file():
        return
    kept.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(out_dir / "adapter" / name, kept / name)
    shutil.copy2(out_dir / "result.json", kept / "result.json")


def restore_adapter(b: Bench, row: str, base: Path, out_dir: Path) -> Any:
    """Rebuild ``out_dir/merged`` from ``base`` + the kept adapter; None when none is kept."""
    kept = _kept_adapter(b, row)
    if not (kept / "result.json").is_file():
        return None
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolve.train.trainer import TrainResult

    b.log(f"  {row}: rebuilding {out_dir / 'merged'} from {base} + {kept}")
    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(kept)).merge_and_unload()
    merged.save_pretrained(str(out_dir / "merged"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out_dir / "merged"))
    r = TrainResult.model_validate_json((kept / "result.json").read_text())
    r = r.model_copy(update={"output_dir": str(out_dir), "merged_dir": str(out_dir / "merged")})
    (out_dir / "result.json").write_text(r.model_dump_json(indent=1))
    return r


def openai_spec(alias: str, base_url: str) -> Any:
    from evolve.specs import PolicySpec

    # default prompt layout (60 actions, JSON answers): the layout the students are trained on
    return PolicySpec(kind="openai", model=alias, base_url=base_url, seed=0, temperature=0.0)


# ------------------------------------------------------------------------ data and knowledge
def train_split(b: Bench) -> Any:
    return dataclasses.replace(b.episodes, split="train")


def oracle_train(b: Bench) -> list[Any]:
    from evolve.specs import PolicySpec

    return train_split(b).run("train:oracle", b.tasks["train"], policy=PolicySpec(kind="oracle"))


def teacher_train(b: Bench, base_url: str | None) -> list[Any]:
    """The 1.5B teacher's own episodes on the train games (None url: only what is stored)."""
    if base_url is None:
        return b.store.trajectories(NS, run_id="train:teacher", arm="train:teacher")
    games = b.tasks["train"][: b.args.teacher_train]
    return train_split(b).run("train:teacher", games, policy=openai_spec(b.args.teacher, base_url))


def knowledge(b: Bench, train: list[Any]) -> list[Any]:
    """Skills + guardrails from the train episodes, probated on dev games (random policy); once."""
    from evolve.eval import ProbationRunner
    from evolve.skills import distill_knowledge, knowledge_of, run_probation
    from evolve.specs import PolicySpec

    stages = b.store.stages(NS)
    if stages.get("distill", {}).get("status") != "done":
        skills, guards = distill_knowledge(train, store=b.store, namespace=NS)
        b.store.set_stage(NS, "distill", "done", {"skills": len(skills), "guardrails": len(guards)})
    if stages.get("probation", {}).get("status") != "done":
        dev = dataclasses.replace(b.episodes, split="dev", policy=PolicySpec(kind="random", seed=0))
        runner = ProbationRunner(dev, b.memory, b.tasks["dev"], _probation_label)
        cands = knowledge_of(b.store, NS, ("candidate",))
        summary = run_probation(b.store, cands, runner, list(runner.tasks), namespace=NS)
        b.store.set_stage(NS, "probation", "done", summary)
    return knowledge_of(b.store, NS)


def _probation_label(arm: str, know: Any) -> str:
    # each probation evaluation is its own run id (resumable): keyed by the knowledge it ran with
    digest = hashlib.sha1(",".join(sorted(k.id for k in know)).encode()).hexdigest()[:10]
    return f"probation:{arm}:{len(know)}-{digest}"


# ---------------------------------------------------------------------------------- training
def _train_result(out_dir: Path) -> Any:
    from evolve.train.trainer import TrainResult

    f = out_dir / "result.json"
    return TrainResult.model_validate_json(f.read_text()) if f.is_file() else None


def train_row(b: Bench, row: str, train: list[Any], know: list[Any]) -> Any:
    """Train a student row (or reuse its finished output dir); returns the TrainResult."""
    from evolve.llm.prompts import PromptOptions
    from evolve.synth import sft_examples
    from evolve.train.onpolicy import train_on_policy
    from evolve.train.trainer import LoraSettings, OnPolicySettings, TrainConfig
    from evolve.train.trainer import train as train_sft

    a = b.args
    student = b.model_hf(a.student)
    out_dir = _train_dir(b, row)
    if (r := _train_result(out_dir)) is not None:
        save_adapter(b, row, out_dir)
        return r
    base = Path(train_row(b, "sft", train, know).merged_dir) if row == "sft+opd" else student
    if (r := restore_adapter(b, row, base, out_dir)) is not None:
        return r
    common = {
        "output_dir": str(out_dir),
        "lora": LoraSettings(**LORA),
        "dtype": "float32",
        "save_every": 1,
        "max_length": 4096,
        "max_tokens_per_batch": 4096,
    }
    t0 = time.perf_counter()
    if row == "sft":
        examples = sft_examples(train, namespace=NS, options=PromptOptions())
        b.log(f"  sft: {len(examples)} examples from {sum(t.success for t in train)} won train episodes")
        cfg = TrainConfig(student=str(student), method="sft", lr=a.sft_lr, max_steps=a.sft_steps, **common)
        r = train_sft(cfg, examples)
    else:
        op = {"envs": 2, "max_turns": 3, "max_new_tokens": 48, "temperature": 1.0}
        if row == "sft+opd":
            cfg = TrainConfig(
                student=str(base), method="opd", teacher=str(b.model_hf(a.teacher)),
                lr=1e-4, schedule="constant", max_steps=a.op_steps, on_policy=OnPolicySettings(**op), **common,
            )  # fmt: skip
            hooks = None
        else:
            method = row  # opsd | skill_sd
            cfg = TrainConfig(
                student=str(student), method=method, lr=1e-4, schedule="constant", max_steps=a.op_steps,
                on_policy=OnPolicySettings(**op), **common,
            )  # fmt: skip
            hooks = b.memory.evolve(know) if row == "skill_sd" else None
        r = train_on_policy(cfg, b.spec, b.store, namespace=NS, run_id=f"train:{row}", knowledge_hooks=hooks)
    b.log(f"  {row}: trained in {time.perf_counter() - t0:.0f} s -> {r.merged_dir}")
    save_adapter(b, row, out_dir)
    return r


def row_gguf(b: Bench, row: str, result: Any) -> Path:
    """The GGUF llama.cpp serves for a row: the base file, or the trained checkpoint exported."""
    if row == "teacher":
        return b.model_gguf(b.args.teacher)
    base = b.model_gguf(b.args.student)
    if row == "before":
        return base
    from evolve.llm.gguf_export import export_gguf

    path = b.out / "models" / f"{b.args.student}-{row.replace('+', '-')}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rep = export_gguf(result.merged_dir, base, path, changed_type=b.args.gguf_type)
        b.log(f"  {row}: exported {path} ({rep})")
    return path


# ------------------------------------------------------------------------------------- eval
def play(
    b: Bench, row: str, base_url: str, alias: str, know: list[Any], train: list[Any], arms: Any = ARMS
) -> None:
    from evolve.eval.harness import arm_hooks

    for arm in arms:
        hooks = arm_hooks(arm, b.memory, know, train)
        trajs = b.episodes.run(
            f"{row}:{arm}", b.tasks["test"], hooks=hooks, policy=openai_spec(alias, base_url)
        )
        b.log(f"  {row}:{arm}: {sum(t.success for t in trajs)}/{len(trajs)} won")
        keep.save(b.store, NS, b.out)


def table_main(args: argparse.Namespace) -> None:
    import torch
    from local_llm import local_server

    torch.set_num_threads(args.threads)
    b = setup(args)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := [r for r in rows if r not in ROWS]:
        sys.exit(f"unknown row(s) {bad}; rows are {', '.join(ROWS)}")
    t0 = time.perf_counter()
    if not args.report_only:
        b.log(
            f"train {len(b.tasks['train'])} / dev {len(b.tasks['dev'])} / test {len(b.tasks['test'])} games"
        )
        oracle = oracle_train(b)
        teacher_url = None
        with local_server(gguf=b.model_gguf(args.teacher), threads=args.threads) as url:
            teacher_url = url
            teacher = teacher_train(b, teacher_url)
            know = knowledge(b, oracle + teacher)
            keep.save(b.store, NS, b.out)
            b.log(
                f"  knowledge: {len(know)} active; teacher won {sum(t.success for t in teacher)}/{len(teacher)} train games"
            )
            if "teacher" in rows:
                arms = [x for x in args.teacher_arms.split(",") if x in ARMS]
                play(b, "teacher", url, args.teacher, know, oracle + teacher, arms)
        train = oracle + teacher
        if "oracle" in rows:
            from evolve.specs import PolicySpec

            b.episodes.run("oracle:no_memory", b.tasks["test"], policy=PolicySpec(kind="oracle"))
            keep.save(b.store, NS, b.out)
        for row in [r for r in rows if r in MODEL_ROWS and r != "teacher"]:
            b.log(f"row {row}")
            result = None if row == "before" else train_row(b, row, train, know)
            gguf = row_gguf(b, row, result)
            with local_server(gguf=gguf, threads=args.threads) as url:
                # the memory arm first: it is the cheaper one (memory runs some steps itself)
                play(b, row, url, gguf.stem, know, train, ("evolve", "no_memory"))
    report(b, time.perf_counter() - t0)
    b.store.close()


# ----------------------------------------------------------------------------------- report
def report(b: Bench, wall: float) -> None:
    from _table import print_table

    from evolve.eval import arm_metrics
    from evolve.eval.metrics import compare

    runs: dict[str, list[Any]] = {}
    for label in [f"{r}:{a}" for r in ROWS for a in ARMS]:
        trajs = b.store.trajectories(NS, run_id=label, arm=label, split="test")
        if trajs:
            runs[label] = sorted(trajs, key=lambda t: t.task_id)
    if not runs:
        b.log("nothing to report yet")
        return
    # Rows measured before the episodes were kept in git (their per-episode data is gone): carried
    # over from the last results.json as they were, marked, and left out of the paired comparisons.
    prev = b.out / "results.json"
    carried = {
        k: v | {"carried": True}
        for k, v in (json.loads(prev.read_text())["rows"] if prev.is_file() else {}).items()
        if k not in runs and (v.get("carried") or v["episodes"] >= b.args.n_test)
    }
    results: dict[str, Any] = {"rows": dict(carried), "compare": {}, "train": {}}
    for label, trajs in runs.items():
        tr = _train_result(_train_dir(b, label.split(":")[0]))
        cost = (
            {"examples": len(tr.examples), "episodes": len(tr.trajectories), "tokens": tr.tokens,
             "wall_s": tr.wall_s, "peak_rss_gb": tr.peak_rss_mb / 1024, "losses": tr.losses}
            if tr is not None else None
        )  # fmt: skip
        results["rows"][label] = arm_metrics(label, trajs).model_dump(mode="json") | {"train": cost}
    table = []
    for label, m in results["rows"].items():
        s, cost = m["success"], m.get("train")
        table.append(
            [label + (" *" if m.get("carried") else ""), m["episodes"],
             f"{100 * s['mean']:.1f} [{100 * s['lo']:.0f}, {100 * s['hi']:.0f}]", f"{m['score']['mean']:.1f}",
             m["steps_mean"], f"{m['prompt_tokens_per_step']:.0f}+{m['completion_tokens_per_step']:.0f}",
             m["latency_p50_s"],
             None if cost is None else (cost["examples"] or cost["episodes"]),
             None if cost is None else cost["tokens"], None if cost is None else cost["wall_s"],
             None if cost is None else cost["peak_rss_gb"]]
        )  # fmt: skip
    md = print_table(
        f"Student table: TextWorld, {len(b.tasks['test'])} held-out games x seed 0, max {b.args.max_steps} steps",
        ["row:arm", "episodes", "success % [95% CI]", "score", "steps", "tokens/action", "s/action p50",
         "train examples|episodes", "train tokens", "train s", "train peak RSS GB"],
        table,
        console=CONSOLE,
    )  # fmt: skip
    pairs = [("before:evolve", "teacher:no_memory"), ("sft:no_memory", "teacher:no_memory"),
             ("sft:evolve", "teacher:no_memory"), ("opsd:no_memory", "sft:no_memory"),
             ("sft+opd:no_memory", "sft:no_memory"), ("skill_sd:no_memory", "sft:no_memory"),
             ("sft:no_memory", "before:no_memory"), ("before:evolve", "before:no_memory"),
             ("teacher:evolve", "teacher:no_memory"), ("sft:evolve", "sft:no_memory"),
             ("opsd:evolve", "opsd:no_memory"), ("opsd:evolve", "sft:evolve"),
             ("sft+opd:evolve", "sft+opd:no_memory"), ("sft+opd:evolve", "sft:evolve"),
             ("skill_sd:evolve", "skill_sd:no_memory"), ("skill_sd:evolve", "sft:evolve"),
             ("skill_sd:no_memory", "opsd:no_memory")]  # fmt: skip
    lines = []
    for a_, b_ in pairs:
        if a_ in runs and b_ in runs:
            c = compare(a_, runs[a_], b_, runs[b_])
            results["compare"][f"{a_} - {b_}"] = c.model_dump(mode="json")
            d = c.success_delta
            lines.append(
                f"- {a_} - {b_}: {100 * d.mean:+.1f} success points [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}], "
                f"score {c.score_delta.mean:+.1f} ({c.paired_episodes} paired episodes)"
            )
    text = md + "\n\nPaired on the same games and seed:\n" + "\n".join(lines) + "\n"
    if carried:
        text += (
            "\n\\* measured on the same games and seed by an earlier run whose per-episode data was not"
            " kept: shown as recorded, not in the paired comparisons.\n"
        )
    CONSOLE.print("\n".join(lines))
    (b.out / "table.md").write_text(text)
    results["wall_s"] = wall
    (b.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plots(b, runs, results)


def plots(b: Bench, runs: dict[str, list[Any]], results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if any(f"{r}:{a}" in results["rows"] for a in ARMS)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, arm in enumerate(ARMS):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(rows):
            m = results["rows"].get(f"{r}:{arm}")
            if m is None:
                continue
            xs.append(j + (i - 0.5) * width)
            ys.append(100 * m["success"]["mean"])
            lo.append(100 * (m["success"]["mean"] - m["success"]["lo"]))
            hi.append(100 * (m["success"]["hi"] - m["success"]["mean"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=arm)
    ax.set_xticks(range(len(rows)), rows)
    ax.set_ylabel("success % (95% CI)")
    ax.set_title("0.5B student rows vs the 1.5B teacher, TextWorld held-out games")
    ax.legend()
    fig.tight_layout()
    fig.savefig(b.out / "success_by_row.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, m in results["rows"].items():
        if label.endswith(":no_memory") and m["train"] and m["train"]["losses"]:
            ax.plot(
                range(1, len(m["train"]["losses"]) + 1), m["train"]["losses"], marker="o", label=label[:-10]
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training curves")
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(b.out / "training_curves.png", dpi=120)
    plt.close(fig)
