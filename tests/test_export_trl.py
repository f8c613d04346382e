"""TRL's trainers take our export unchanged: one SFTTrainer step and one DPOTrainer step.

The data are real TextWorld trajectories (oracle and random on the same game) rendered by synth;
the model is the tiny Qwen2 saved by ``tests/tiny_models.py`` with its ChatML tokenizer. CPU,
``report_to="none"``, one optimizer step each; the loss must be finite and the weights must move.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from evolve.agents.collect import collect
from evolve.llm.prompts import PromptOptions
from evolve.schema import Trajectory
from evolve.synth import preference_examples, sft_examples
from evolve.train.data import to_trl_dataset

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

# Short prompts (few history turns, few actions) keep the tiny model's sequences small.
OPTIONS = PromptOptions(max_turns=2, max_actions=6, max_current_obs_chars=600)
MAX_LENGTH = 1024


@pytest.fixture(scope="module")
def trajs() -> list[Trajectory]:
    env = {"name": "textworld", "n_train": 1}
    oracle = collect(env, {"kind": "oracle"}, max_steps=20, progress=False)
    rand = collect(env, {"kind": "random"}, n_episodes=3, max_steps=3, progress=False)
    return oracle + rand


def _load(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _common(tmp_path: Path) -> dict[str, Any]:
    return {
        "output_dir": str(tmp_path),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _changed(model: Any, before: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], v.detach()) for k, v in model.named_parameters() if k in before)


def _loss(trainer: Any) -> float:
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged, trainer.state.log_history
    return float(logged[0])


def test_sft_trainer_one_step_on_our_export(
    trajs: list[Trajectory], tiny_model_dir: Path, tmp_path: Path
) -> None:
    examples = sft_examples(trajs, options=OPTIONS)
    ds = to_trl_dataset(examples, "sft")
    assert set(ds.column_names) == {"id", "prompt", "completion"} and len(ds) == len(examples)
    row = ds[0]
    assert row["prompt"] == examples[0].messages[:-1] and row["completion"] == examples[0].messages[-1:]

    model, tok = _load(tiny_model_dir)
    before = _snapshot(model)
    args = trl.SFTConfig(max_length=MAX_LENGTH, **_common(tmp_path))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert math.isfinite(_loss(trainer)) and _loss(trainer) > 0
    assert _changed(model, before) > 0


def test_dpo_trainer_one_step_on_our_pairs(
    trajs: list[Trajectory], tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = preference_examples(trajs, options=OPTIONS)
    assert len(pairs) >= 2
    ds = to_trl_dataset(pairs, "preference")
    assert set(ds.column_names) == {"id", "prompt", "chosen", "rejected"}
    assert ds[0]["chosen"] == [{"role": "assistant", "content": pairs[0].chosen}]

    model, tok = _load(tiny_model_dir)
    before = _snapshot(model)
    args = trl.DPOConfig(max_length=MAX_LENGTH, beta=0.1, **_common(tmp_path))
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    loss = _loss(trainer)
    assert math.isfinite(loss) and loss > 0
    assert _changed(model, before) > 0
