"""The training loop on tiny saved models: overfit (LoRA and full), accumulation and 2-process
equivalence, kill -9 + exact resume, corrupt-checkpoint fallback, distillation, the merged model as
an ``hf`` policy, and the one-line errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from conftest import find_free_port  # noqa: E402
from tiny_models import build_tiny_causal_lm  # noqa: E402

from evolve.errors import EvolveError  # noqa: E402
from evolve.schema import ExampleKind, TrainingExample  # noqa: E402
from evolve.train import TrainConfig, TrainError, TrainResult, train  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent

WORDS = ["apple", "fridge", "knife", "table", "stove", "door", "key", "pot"]


def example(i: int, *, answer: str | None = None) -> TrainingExample:
    w = WORDS[i % len(WORDS)]
    return TrainingExample(
        id=f"ex-{i}",
        kind=ExampleKind.sft,
        messages=[
            {"role": "system", "content": "You are an agent in a text adventure."},
            {"role": "user", "content": f"Observation: You are in the kitchen. There is a {w} here."},
            {
                "role": "assistant",
                "content": answer or json.dumps({"thought": "take it" + " now" * i, "command": f"take {w}"}),
            },
        ],
        provenance=[f"traj-{i // 2}"],
    )


EXAMPLES = [example(i) for i in range(4)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the 2 shared cores are busy; in-process and subprocess runs then agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model with its (tied) embeddings scaled x10: logits of a useful range, so a few
    LoRA steps can move them (at init std 0.02 they span about +-0.5)."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_causal_lm(tmp_path_factory.mktemp("student"))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(str(path))
    return path


def config(model_dir: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "student": str(model_dir),
        "output_dir": str(out),
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "lr": 1e-2,
        "schedule": "constant",
        "max_tokens_per_batch": 4096,
        "max_grad_norm": None,
        "save_merged": False,
    }
    return TrainConfig.model_validate(base | kw)


def weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def max_len(model_dir: Path, examples: list[TrainingExample]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return max(
        len(tok.apply_chat_template(e.messages, tokenize=True, return_dict=True)["input_ids"])
        for e in examples
    )


# --------------------------------------------------------------------------- learning


def test_lora_learns_and_the_merged_dir_is_an_hf_policy(student_dir: Path, tmp_path: Path) -> None:
    """Trained on the policy's own prompt for one step, the merged model (as an ``hf`` policy)
    ranks the trained answer first, where the base model ranked another."""
    from transformers import AutoTokenizer

    from evolve.agents.policies import make_policy
    from evolve.llm.prompts import PromptOptions, build_messages
    from evolve.schema import EnvState, MemoryContext, Observation, Task

    task = Task(id="k1", env="toy", goal="put the apple in the fridge")
    obs = Observation(
        text="You are in the kitchen.",
        state=EnvState(location="kitchen", score=0, max_score=1),
        goal=task.goal,
        admissible_actions=["look", "take apple", "open fridge", "go north"],
    )

    def act(model_dir: str) -> str:
        policy = make_policy({"kind": "hf", "path": model_dir, "mode": "rank"})
        policy.reset(task)
        return policy.act(obs, [], MemoryContext()).action.text

    assert act(str(student_dir)) != "open fridge"
    prompt = build_messages(task.goal, obs, [], MemoryContext(), PromptOptions(action_format="command"))
    ex = TrainingExample(
        id="ex-p", kind=ExampleKind.sft, messages=[*prompt, {"role": "assistant", "content": "open fridge"}]
    )
    result = train(
        config(student_dir, tmp_path / "run", max_steps=15, save_merged=True), [ex], progress=False
    )

    assert result.steps == 15 and len(result.losses) == 15
    assert result.losses[-1] < 0.4 * result.losses[0]
    assert result.trained_tokens == 15 * (result.trained_tokens // 15) > 0
    assert result.tokens > result.trained_tokens and result.tokens_per_s > 0 and result.peak_rss_mb > 0
    assert result.examples == ["ex-p"]
    assert (Path(result.adapter_dir) / "adapter_config.json").is_file()
    merged = Path(result.merged_dir)
    original = AutoTokenizer.from_pretrained(str(student_dir)).chat_template
    assert AutoTokenizer.from_pretrained(str(merged)).chat_template == original
    assert act(str(merged)) == "open fridge"


def test_full_finetune_loss_decreases_and_reports(student_dir: Path, tmp_path: Path) -> None:
    cfg = config(student_dir, tmp_path / "full", lora=None, epochs=8, eval_ratio=0.25, eval_every=4)
    result = train(cfg, EXAMPLES, progress=True)  # the rich bar draws (into pytest's capture)
    assert result.adapter_dir is None
    assert len(result.examples) == 3 and len(result.eval_examples) == 1
    assert result.steps == 8 and result.losses[-1] < 0.5 * result.losses[0]
    assert [s for s, _ in result.eval_losses] == [4, 8]
    assert result.trajectories == sorted(
        {t for e in EXAMPLES if e.id in result.examples for t in e.provenance}
    )
    assert json.loads((tmp_path / "full" / "result.json").read_text())["steps"] == 8


def test_grad_accumulation_matches_one_big_batch(student_dir: Path, tmp_path: Path) -> None:
    """Batch 4 x accumulation 1 == batch 1 x accumulation 4, in losses and weights."""
    t = max_len(student_dir, EXAMPLES)
    common = {"epochs": 3, "save_every": 3}
    big = train(
        config(student_dir, tmp_path / "big", max_tokens_per_batch=4 * t, **common),
        EXAMPLES,
        progress=False,
    )
    small = train(
        config(student_dir, tmp_path / "small", max_tokens_per_batch=t, grad_accum=4, **common),
        EXAMPLES,
        progress=False,
    )
    assert big.steps == small.steps == 3
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    assert big.trained_tokens == small.trained_tokens
    assert_same_weights(
        weights(Path(big.checkpoint) / "trainable.safetensors"),
        weights(Path(small.checkpoint) / "trainable.safetensors"),
        atol=1e-5,
    )


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_changes_memory_not_results(
    student_dir: Path, tmp_path: Path, lora: bool
) -> None:
    """Activation checkpointing recomputes the forward in the backward: same losses, same weights."""
    common: dict[str, Any] = {"epochs": 2, "save_every": 2, "save_merged": True}
    if not lora:
        common["lora"] = None
        common["lr"] = 1e-3
    plain = train(config(student_dir, tmp_path / "plain", **common), EXAMPLES, progress=False)
    ckpt = train(
        config(student_dir, tmp_path / "ckpt", gradient_checkpointing=True, **common),
        EXAMPLES,
        progress=False,
    )
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    assert_same_weights(
        weights(Path(plain.checkpoint) / "trainable.safetensors"),
        weights(Path(ckpt.checkpoint) / "trainable.safetensors"),
        atol=1e-5,
    )
    cfg = json.loads((Path(ckpt.merged_dir) / "config.json").read_text())
    assert cfg.get("use_cache", True) is True  # the merged model generates with its cache again


def test_distill_from_a_local_teacher(student_dir: Path, tmp_path: Path) -> None:
    teacher = build_tiny_causal_lm(tmp_path / "teacher", hidden_size=48, seed=1)  # same tokenizer, wider
    cfg = config(
        student_dir, tmp_path / "kd", method="distill", loss="forward_kl", teacher=str(teacher), epochs=6
    )
    result = train(cfg, EXAMPLES, progress=False)
    assert result.losses[-1] < 0.7 * result.losses[0]


def test_the_step_plan_is_fixed_in_advance(tmp_path: Path) -> None:
    from evolve.train.trainer import _step_plan

    def cfg(**kw: Any) -> TrainConfig:
        return TrainConfig(student="s", output_dir=str(tmp_path), **kw)

    four = lambda epoch: 4  # noqa: E731 - batches per epoch
    assert _step_plan(cfg(epochs=1), four, 2) == [(0, 0), (0, 2)]
    assert _step_plan(cfg(epochs=1.5), four, 1) == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert _step_plan(cfg(epochs=1, max_steps=5), four, 3) == [(0, 0), (0, 3), (1, 0), (1, 3), (2, 0)]


# --------------------------------------------------------------------------- processes and resume

RUNNER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from evolve.schema import TrainingExample
from evolve.train import TrainConfig, train
cfg = TrainConfig.model_validate_json(Path(sys.argv[1]).read_text())
examples = [TrainingExample.model_validate_json(x) for x in Path(sys.argv[2]).read_text().splitlines()]
delay = float(sys.argv[3])
train(cfg, examples, progress=False, on_step=lambda step, loss: time.sleep(delay))
"""


def write_job(tmp: Path, cfg: TrainConfig, examples: list[TrainingExample]) -> tuple[Path, Path, Path]:
    runner = tmp / "runner.py"
    runner.write_text(RUNNER.format(tests=str(TESTS_DIR)))
    (tmp / "cfg.json").write_text(cfg.model_dump_json())
    (tmp / "ex.jsonl").write_text("\n".join(e.model_dump_json() for e in examples))
    return runner, tmp / "cfg.json", tmp / "ex.jsonl"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def test_two_processes_match_one_with_the_same_global_batch(student_dir: Path, tmp_path: Path) -> None:
    t = max_len(student_dir, EXAMPLES)
    kw = {"max_tokens_per_batch": t, "grad_accum": 2, "epochs": 2}
    one = train(config(student_dir, tmp_path / "one", **kw), EXAMPLES, progress=False)
    runner, cfg_path, ex_path = write_job(tmp_path, config(student_dir, tmp_path / "two", **kw), EXAMPLES)
    # torchrun + ACCELERATE_USE_CPU: accelerate's own multi-CPU (gloo) set-up from the env vars it
    # reads (``accelerate launch --cpu`` starts a single process).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(find_free_port()), str(runner), str(cfg_path), str(ex_path), "0"]
    proc = subprocess.run(
        cmd, env=env() | {"ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = TrainResult.model_validate_json((tmp_path / "two" / "result.json").read_text())
    assert (one.processes, two.processes) == (1, 2)
    assert one.steps == two.steps == 4
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.trained_tokens == one.trained_tokens
    assert_same_weights(
        weights(Path(one.adapter_dir) / "adapter_model.safetensors"),
        weights(Path(two.adapter_dir) / "adapter_model.safetensors"),
        atol=1e-5,
    )


def test_kill_9_then_resume_gives_the_uninterrupted_weights(student_dir: Path, tmp_path: Path) -> None:
    kw = {"epochs": 8, "max_tokens_per_batch": 2 * max_len(student_dir, EXAMPLES), "save_every": 2}
    kw["lora"] = {"r": 8, "alpha": 16, "dropout": 0.1}  # dropout: the RNG state must be restored too
    reference = train(config(student_dir, tmp_path / "ref", **kw), EXAMPLES, progress=False)
    assert reference.steps == 16

    out = tmp_path / "killed"
    runner, cfg_path, ex_path = write_job(tmp_path, config(student_dir, out, **kw), EXAMPLES)
    proc = subprocess.Popen(
        [sys.executable, str(runner), str(cfg_path), str(ex_path), "0.25"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = out / "checkpoints" / "step-4"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), (
        proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists()  # it really died mid-run

    resumed = train(config(student_dir, out, **kw), EXAMPLES, progress=False)
    assert resumed.resumed_from is not None and 4 <= resumed.resumed_from < 16
    assert resumed.steps == 16
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    assert_same_weights(
        weights(Path(reference.adapter_dir) / "adapter_model.safetensors"),
        weights(Path(resumed.adapter_dir) / "adapter_model.safetensors"),
    )


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous(
    student_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kw = {"epochs": 4, "save_every": 1}
    first = train(config(student_dir, tmp_path / "run", **kw), EXAMPLES, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3", "step-4"]  # keep_checkpoints=2
    blob = ckpts / "step-4" / "trainable.safetensors"
    data = bytearray(blob.read_bytes())
    data[-8:] = b"\xff" * 8
    blob.write_bytes(bytes(data))
    (ckpts / "step-5.tmp").mkdir()  # a write that was killed before its rename: ignored
    adapter_before = weights(Path(first.adapter_dir) / "adapter_model.safetensors")
    shutil.rmtree(first.adapter_dir)

    with caplog.at_level(logging.WARNING, logger="evolve.train.trainer"):
        again = train(config(student_dir, tmp_path / "run", **kw), EXAMPLES, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "checkpoint step-4 is corrupt (trainable.safetensors does not match its checksum); "
        "resuming from step-3"
    ]
    assert again.resumed_from == 3 and again.steps == 4
    assert again.losses == pytest.approx(first.losses, rel=1e-6)
    assert_same_weights(adapter_before, weights(Path(again.adapter_dir) / "adapter_model.safetensors"))


def test_checkpoints_of_other_settings_are_not_resumed(student_dir: Path, tmp_path: Path) -> None:
    train(config(student_dir, tmp_path / "run", epochs=1, save_every=1), EXAMPLES, progress=False)
    with pytest.raises(TrainError, match="other settings or data"):
        train(
            config(student_dir, tmp_path / "run", epochs=1, save_every=1, lr=1e-3),
            EXAMPLES,
            progress=False,
        )
    fresh = train(
        config(student_dir, tmp_path / "run", epochs=1, save_every=1, lr=1e-3, resume=False),
        EXAMPLES,
        progress=False,
    )
    assert fresh.resumed_from is None and fresh.steps == 1


# --------------------------------------------------------------------------- one-line errors


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and isinstance(e, EvolveError)
    return msg


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(TrainError) as e:
        train(config(tmp_path / "nope", tmp_path / "out"), EXAMPLES, progress=False)
    assert "does not exist" in one_line(e.value)


def test_tokenizer_without_chat_template(student_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(student_dir, bare)
    (bare / "chat_template.jinja").unlink()
    cfg_path = bare / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tc))
    with pytest.raises(TrainError) as e:
        train(config(bare, tmp_path / "out"), EXAMPLES, progress=False)
    assert "no chat template" in one_line(e.value)


def test_examples_without_trainable_tokens(student_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError) as e:  # every answer is cut off by max_length
        train(config(student_dir, tmp_path / "out", max_length=12), EXAMPLES, progress=False)
    assert "no trainable tokens in the 4 training examples" in one_line(e.value)
    no_answer = TrainingExample(id="q", kind=ExampleKind.sft, messages=[{"role": "user", "content": "look"}])
    with pytest.raises(TrainError) as e:
        train(config(student_dir, tmp_path / "out"), [no_answer], progress=False)
    assert "assistant" in one_line(e.value)


def test_teacher_with_another_vocabulary_is_refused(student_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    other = build_tiny_causal_lm(tmp_path / "other", seed=2)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(str(other))
    cfg = config(student_dir, tmp_path / "out", method="distill", loss="forward_kl", teacher=str(other))
    with pytest.raises(TrainError) as e:
        train(cfg, EXAMPLES, progress=False)
    assert "different vocabulary" in one_line(e.value)


def test_out_of_memory_says_what_to_lower(
    student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evolve.train.losses.base as base

    def oom(*args: Any, **kw: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(base, "chunked_loss", oom)
    with pytest.raises(TrainError) as e:
        train(config(student_dir, tmp_path / "out", max_tokens_per_batch=999), EXAMPLES, progress=False)
    msg = one_line(e.value)
    assert msg.startswith("out of memory at step 1: lower max_tokens_per_batch (now 999)")
    assert "gradient_checkpointing" in msg
