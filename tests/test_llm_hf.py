"""evolve.llm.hf on a tiny saved model: loading, batched generation and scoring, live models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evolve.errors import ModelLoadError
from evolve.llm import hf
from evolve.schema import EnvState, MemoryContext, Observation, Task

CHAT = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Take the apple."}]
CHAT2 = [{"role": "user", "content": "Open the fridge and put the apple in it, then look."}]


def test_generation_log_probs_equal_teacher_forced_scores(tiny_lm: tuple[Any, Any]) -> None:
    model, tok = tiny_lm
    gens = hf.generate(model, tok, [CHAT, CHAT2], max_new_tokens=6, temperature=1.0, seed=4)
    assert len(gens) == 2
    for g, msgs in zip(gens, [CHAT, CHAT2], strict=True):
        assert g.prompt_ids == hf.chat_prompt_ids(tok, msgs)
        assert 0 < len(g.token_ids) == len(g.logprobs) <= 6
        assert all(lp <= 0 for lp in g.logprobs)
    # The log-probs reported while generating (left-padded batch) are the model's: scoring the
    # same tokens by teacher forcing (right-padded batch) gives them back.
    scored = hf.score(model, tok, [g.prompt_ids for g in gens], [g.token_ids for g in gens], batch_size=2)
    for g, s in zip(gens, scored, strict=True):
        assert s == pytest.approx(g.logprobs, abs=1e-4)


def test_batched_greedy_generation_equals_one_by_one(tiny_lm: tuple[Any, Any]) -> None:
    model, tok = tiny_lm
    batch = hf.generate(model, tok, [CHAT, CHAT2], max_new_tokens=5)
    alone = [hf.generate(model, tok, [m], max_new_tokens=5)[0] for m in (CHAT, CHAT2)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    ids = hf.generate(model, tok, [alone[0].prompt_ids], max_new_tokens=5)[0]  # token ids in, too
    assert ids.token_ids == alone[0].token_ids


def test_live_model_mode_is_restored(tiny_lm: tuple[Any, Any]) -> None:
    from evolve.agents.policies import HFPolicy

    model, tok = tiny_lm
    model.train()
    try:
        hf.generate(model, tok, [CHAT], max_new_tokens=2)
        assert model.training
        hf.score(model, tok, [[1, 2, 3]], [[4, 5]])
        assert model.training
        # A policy on the live model a trainer updates: no copy, mode untouched, tokens reported.
        policy = HFPolicy.from_model(model, tok, temperature=1.0, seed=1, max_tokens=6)
        assert policy.model is model and model.training
        policy.reset(Task(id="t", env="toy", goal="take the apple"))
        obs = Observation(text="An apple.", state=EnvState(), admissible_actions=None)
        d = policy.act(obs, [], MemoryContext())
        assert model.training
        assert d.error is None and d.token_ids and d.logprobs and d.prompt_token_ids
        assert d.prompt_token_ids == hf.chat_prompt_ids(tok, policy.messages(obs, [], MemoryContext()))
        again = hf.score(model, tok, [d.prompt_token_ids], [d.token_ids])[0]
        assert again == pytest.approx(d.logprobs, abs=1e-4)
        assert d.usage.completion_tokens == len(d.token_ids)
    finally:
        model.eval()


def test_load_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json") as info:
        hf.load_causal_lm(tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        hf.load_causal_lm(tmp_path / "model-q4.gguf")
    with pytest.raises(ModelLoadError, match="does not exist"):
        hf.load_causal_lm(tiny_model_dir, gguf_file="missing.gguf")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        hf.load_causal_lm(tiny_model_dir, dtype="int3")
    model, tok = hf.load_causal_lm(tiny_model_dir, device="cpu", dtype="float32")
    assert not model.training and tok.chat_template
