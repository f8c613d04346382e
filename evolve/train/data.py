"""Training data for the trainer: token-level masks, length-grouped batches, packing, exports.

Masks come from the model's chat template itself: ``apply_chat_template(...,
return_assistant_tokens_mask=True)`` with the template's training twin
(:func:`evolve.train.templates.training_chat_template`: ``{% generation %}`` around each assistant
turn's content and its end-of-turn token). A loss is taken only on what the agent generated
there; the system prompt, observations, memory block and privileged block are context.

Labels follow the Hugging Face convention: ``labels[t]`` is the token at ``t`` (``-100`` where no
loss is taken) and the loss shifts, so the logits at ``t - 1`` predict ``labels[t]``. The first
token of a sequence is never trained (it has nothing to be predicted from), which also makes a
shift across a packing boundary harmless.

Packing: sequences are concatenated in one row with per-sequence position ids and a 4D
block-diagonal causal boolean mask ``[1, 1, T, T]`` (True = may attend), which SDPA takes as it
is. Measured here (transformers 5.24, SDPA, Qwen2 and Llama): transformers' own packed-sequence
detection from ``position_ids`` with ``attention_mask=None`` gives the same logits *only* with
``use_cache=False``; with the default ``use_cache=True`` a cache object is created and every
sequence attends to the ones before it, silently. The explicit mask cannot go wrong that way; a
flash-attention trainer may drop it and pass ``use_cache=False``. Eager attention adds the mask
to the scores and needs it as an additive float mask (``torch.where(mask, 0, min)``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evolve.llm.prompts import add_privileged
from evolve.schema import ExampleKind, TrainingExample
from evolve.train.templates import (
    ChatTemplateError,
    assistant_runs,
    chat_template_of,
    check_training_template,
    training_chat_template,
)

if TYPE_CHECKING:
    import datasets
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TrainOn = Literal["last", "all"]

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ChatTemplateError",
    "Tokenized",
    "load_examples",
    "make_batches",
    "read_openai_jsonl",
    "to_openai_jsonl",
    "to_trl_dataset",
    "tokenize_example",
    "tokenize_examples",
    "training_chat_template",
]


# --------------------------------------------------------------------------- tokenization


@dataclass
class Tokenized:
    """One example as token ids; ``labels`` is ``-100`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    example_id: str
    n_trained: int
    truncated: int = 0
    """Context tokens cut from the left to fit ``max_length``."""


def example_messages(example: TrainingExample, *, privileged: bool = False) -> list[dict[str, Any]]:
    """The chat to train on: the student view, or with ``privileged`` the teacher view
    (:func:`evolve.llm.prompts.add_privileged`, the layout's own function; the student view when
    the example has no privileged context)."""
    if example.kind in (ExampleKind.preference, ExampleKind.reranker):
        raise ValueError(
            f"example {example.id} is a {example.kind.value} example, not a chat to train on "
            "(preference pairs go through to_trl_dataset(..., kind='preference'))"
        )
    msgs = [dict(m) for m in example.messages]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise ValueError(f"example {example.id}: the last message must be the assistant answer")
    if privileged:
        msgs = add_privileged(msgs, example.privileged_context)
    return msgs


def tokenize_example(
    tokenizer: Any,
    example: TrainingExample,
    *,
    max_length: int,
    train_on: TrainOn = "last",
    privileged: bool = False,
) -> Tokenized:
    """Token ids and labels of one example, masks from the chat template.

    ``train_on="last"`` trains only the final assistant turn (per-step examples: the earlier
    turns are context); ``"all"`` every assistant turn. Each trained span is the answer and its
    end-of-turn token; the sequence ends there (the template's trailing newline carries no loss).
    The rendering with the training template is checked byte for byte against
    the model's own template on this example. Longer than ``max_length``: context is cut from the
    left; a trained turn is never cut, it is masked whole if it does not fit (with at least one
    token before it), and when the last one does not fit the example comes back with
    ``n_trained == 0`` (:func:`tokenize_examples` skips and counts those).
    """
    if train_on not in ("last", "all"):
        raise ValueError(f"train_on must be 'last' or 'all', not {train_on!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, not {max_length}")
    messages = example_messages(example, privileged=privileged)
    original = chat_template_of(tokenizer)
    ids, mask = check_training_template(tokenizer, original, training_chat_template(tokenizer), messages)
    runs = assistant_runs(mask)
    if train_on == "last":
        runs = runs[-1:]
    ids = ids[: runs[-1][1]]  # what follows the last answer's end-of-turn token is never trained
    cut = max(0, len(ids) - max_length)
    labels = [IGNORE_INDEX] * (len(ids) - cut)
    n = 0
    for start, end in runs:
        if start - cut < 1:  # cut, or first in the window with nothing to be predicted from
            continue
        labels[start - cut : end - cut] = ids[start:end]
        n += end - start
    if runs and runs[-1][0] - cut < 1:  # the turn that matters most does not fit
        labels, n = [IGNORE_INDEX] * len(labels), 0
    return Tokenized(input_ids=ids[cut:], labels=labels, example_id=example.id, n_trained=n, truncated=cut)


def tokenize_examples(
    tokenizer: Any,
    examples: Iterable[TrainingExample],
    *,
    max_length: int,
    train_on: TrainOn = "last",
    privileged: bool = False,
) -> tuple[list[Tokenized], list[str]]:
    """``(items with trainable tokens, ids of the examples skipped)``; one warning line when any is."""
    items, skipped = [], []
    for ex in examples:
        t = tokenize_example(tokenizer, ex, max_length=max_length, train_on=train_on, privileged=privileged)
        if t.n_trained:
            items.append(t)
        else:
            skipped.append(ex.id)
    if skipped:
        log.warning(
            "%d examples skipped: no trainable token within max_length=%d (e.g. %s)",
            len(skipped),
            max_length,
            skipped[0],
        )
    return items, skipped


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Tensors for one forward pass.

    ``attention_mask`` is ``[B, T]`` (1 = token, 0 = padding) for padded batches and ``[1, 1, T, T]``
    boolean (True = may attend; causal within each sequence, nothing across) for packed ones.
    ``position_ids`` restart at 0 for each packed sequence. ``n_trained``: tokens with a label.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    n_trained: int
    example_ids: list[str]

    @property
    def packed(self) -> bool:
        return self.attention_mask.dim() == 4


def _order(items: Sequence[Tokenized], seed: int, shuffle: bool) -> list[int]:
    """Indices by length (longest first), ties broken at random when shuffling."""
    rng = random.Random(seed)
    tie = [rng.random() if shuffle else 0.0 for _ in items]
    return sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), tie[i], i))


def _group(
    items: Sequence[Tokenized], max_tokens: int, pack: bool, seed: int, shuffle: bool
) -> list[list[int]]:
    """Indices per batch. Padded: sorted by length, each batch as many as fit ``B * longest <=
    max_tokens``. Packed: first-fit decreasing into rows of ``max_tokens``. An item longer than
    ``max_tokens`` gets a batch of its own."""
    order = _order(items, seed, shuffle)
    groups: list[list[int]] = []
    if pack:
        room: list[int] = []
        for i in order:
            n = len(items[i].input_ids)
            for g, free in enumerate(room):
                if n <= free:
                    groups[g].append(i)
                    room[g] -= n
                    break
            else:
                groups.append([i])
                room.append(max_tokens - n)
        return groups
    for i in order:  # longest first: the first item of a group sets its width
        if groups and len(items[groups[-1][0]].input_ids) * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _padded(items: Sequence[Tokenized], pad_id: int) -> Batch:
    import torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    pos = torch.zeros((len(items), width), dtype=torch.long)
    for r, t in enumerate(items):
        n = len(t.input_ids)
        ids[r, :n] = torch.tensor(t.input_ids)
        labels[r, :n] = torch.tensor(t.labels)
        attn[r, :n] = 1
        pos[r, :n] = torch.arange(n)
    return Batch(ids, labels, attn, pos, sum(t.n_trained for t in items), [t.example_id for t in items])


def _packed(items: Sequence[Tokenized]) -> Batch:
    import torch

    ids = torch.tensor([x for t in items for x in t.input_ids])[None]
    labels = torch.tensor([x for t in items for x in t.labels])[None]
    pos = torch.cat([torch.arange(len(t.input_ids)) for t in items])[None]
    seg = torch.cat([torch.full((len(t.input_ids),), k) for k, t in enumerate(items)])
    width = seg.numel()
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    return Batch(ids, labels, mask, pos, sum(t.n_trained for t in items), [t.example_id for t in items])


def make_batches(
    items: Sequence[Tokenized],
    *,
    max_tokens: int,
    pack: bool,
    seed: int,
    shuffle: bool = True,
    pad_id: int = 0,
) -> list[Batch]:
    """Length-grouped dynamic batches of at most ``max_tokens`` tokens (padding included).

    ``pack=False``: sequences of similar length padded on the right to the longest of the batch.
    ``pack=True``: sequences concatenated in one row, each with its own position ids and a mask
    that never lets one attend to another (see the module docstring). ``shuffle`` shuffles the
    order of the batches (and which of equal-length items go together) with ``seed``; without it
    the batches come longest first, the same every time. Deterministic for a given ``seed``.
    ``pad_id`` fills padding, which is masked and carries no label. A packed row's mask is
    ``T * T`` booleans (64 MiB for ``max_tokens=8192``).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    items = list(items)
    for t in items:
        if t.labels and t.labels[0] != IGNORE_INDEX:
            raise ValueError(f"example {t.example_id}: its first token has a label (nothing predicts it)")
    groups = _group(items, max_tokens, pack, seed, shuffle)
    if shuffle:
        random.Random(seed + 1).shuffle(groups)
    return [
        _packed([items[i] for i in g]) if pack else _padded([items[i] for i in g], pad_id) for g in groups
    ]


# --------------------------------------------------------------------------- store + exports


def load_examples(
    store: Any, namespace: str | None = None, kinds: Sequence[str | ExampleKind] = ("sft",)
) -> list[TrainingExample]:
    """The store's training examples of ``kinds`` in ``namespace``, kind by kind in the order given."""
    out: list[TrainingExample] = []
    for kind in kinds:
        out += store.examples(namespace, kind=ExampleKind(kind).value)
    return out


def _trained_flags(messages: Sequence[dict[str, Any]], train_on: TrainOn) -> list[bool]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [m["role"] == "assistant" and (train_on == "all" or i == last) for i, m in enumerate(messages)]


def _chat(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def to_openai_jsonl(
    examples: Iterable[TrainingExample],
    path: str | Path,
    *,
    train_on: TrainOn = "last",
    privileged: bool = False,
) -> int:
    """Write OpenAI fine-tuning JSONL; returns the number of lines.

    Chats (sft / privileged): ``{"messages": [...]}`` with ``"weight": 1`` on the trained
    assistant message(s) and ``"weight": 0`` on the others (``train_on`` as in
    :func:`tokenize_example`). Preference pairs: the DPO format ``{"input": {"messages": prompt},
    "preferred_output": [answer], "non_preferred_output": [answer]}``.
    """
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            if ex.kind == ExampleKind.preference:
                row: dict[str, Any] = {
                    "input": {"messages": _chat(ex.messages)},
                    "preferred_output": [{"role": "assistant", "content": ex.chosen or ""}],
                    "non_preferred_output": [{"role": "assistant", "content": ex.rejected or ""}],
                }
            else:
                msgs = _chat(example_messages(ex, privileged=privileged))
                for m, trained in zip(msgs, _trained_flags(msgs, train_on)):
                    if m["role"] == "assistant":
                        m["weight"] = int(trained)  # type: ignore[assignment]
                row = {"messages": msgs}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_openai_jsonl(path: str | Path, namespace: str = "default") -> list[TrainingExample]:
    """The examples of an OpenAI fine-tuning JSONL file (chats -> sft, DPO rows -> preference).

    A chat's messages end at its last trained (``weight`` 1 or absent) assistant message; the
    weights themselves are not kept (a TrainingExample trains its last turn).
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            if "input" in row:
                out.append(
                    TrainingExample(
                        id=f"ex-jsonl-{i}",
                        namespace=namespace,
                        kind=ExampleKind.preference,
                        messages=row["input"]["messages"],
                        chosen=row["preferred_output"][0]["content"],
                        rejected=row["non_preferred_output"][0]["content"],
                    )
                )
                continue
            msgs = row["messages"]
            trained = [j for j, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1)]
            if not trained:
                raise ValueError(f"{path}:{i + 1}: no trained assistant message")
            chat = [{"role": m["role"], "content": m["content"]} for m in msgs[: trained[-1] + 1]]
            out.append(
                TrainingExample(id=f"ex-jsonl-{i}", namespace=namespace, kind=ExampleKind.sft, messages=chat)
            )
    return out


def to_trl_dataset(
    examples: Iterable[TrainingExample],
    kind: Literal["sft", "preference"] = "sft",
    *,
    privileged: bool = False,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` in TRL's conversational prompt-completion format.

    ``kind="sft"`` (sft and privileged examples; the teacher view with ``privileged``):
    ``prompt`` = the messages before the answer (history turns included, untrained),
    ``completion`` = ``[answer]``, what ``SFTTrainer`` trains on. ``kind="preference"``:
    ``prompt``, ``chosen = [answer]``, ``rejected = [answer]``, what ``DPOTrainer`` takes.
    Other kinds are skipped. ``id`` carries the example id.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("to_trl_dataset needs the 'datasets' package: pip install datasets") from e

    rows: list[dict[str, Any]] = []
    for ex in examples:
        if kind == "preference":
            if ex.kind != ExampleKind.preference:
                continue
            rows.append(
                {
                    "id": ex.id,
                    "prompt": _chat(ex.messages),
                    "chosen": [{"role": "assistant", "content": ex.chosen or ""}],
                    "rejected": [{"role": "assistant", "content": ex.rejected or ""}],
                }
            )
        elif kind == "sft":
            if ex.kind not in (ExampleKind.sft, ExampleKind.privileged):
                continue
            msgs = _chat(example_messages(ex, privileged=privileged))
            rows.append({"id": ex.id, "prompt": msgs[:-1], "completion": msgs[-1:]})
        else:
            raise ValueError(f"kind must be 'sft' or 'preference', not {kind!r}")
    if not rows:
        raise ValueError(f"no {kind} examples to export")
    return datasets.Dataset.from_list(rows)
