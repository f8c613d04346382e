"""Tiny causal LMs for tests, built offline from a config and saved like a user's checkpoint.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a small in-code
corpus (so any text, including unseen words, encodes), wrapped in ``PreTrainedTokenizerFast``
with ChatML special tokens and a chat template; the model is a 2-layer Qwen2 with random
weights (seeded). Both are written with ``save_pretrained`` and must be loaded back with
``from_pretrained(dir)``, the same path a real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

# ChatML, the layout Qwen2 instruct models use; ``generation`` markers let
# ``return_assistant_tokens_mask`` work for the trainers' loss masks.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Words of text games and of our prompts, so the BPE learns useful merges.
_CORPUS = """
You are an agent in a text adventure. Choose one command from the admissible actions.
Reply with a JSON object {"thought": "short reason", "command": "one admissible action"}.
Task: cook a meal. Find the apple in the kitchen and put it in the fridge.
Observation: You are in the kitchen. There is a fridge, a table, a knife and an apple here.
State: location kitchen; inventory: nothing; score 0 of 3.
Admissible actions: look, inventory, go north, go south, go east, go west, take apple,
drop apple, open fridge, close fridge, put apple in fridge, take knife, examine table,
eat apple, slice apple with knife, cook apple with stove, open door, unlock door with key.
You pick up the apple. You open the fridge. The fridge is empty. Your score has just gone up.
focus on the thermometer, move to the living room, activate stove, pour water into pot,
measure the temperature of water, wait, teleport to kitchen, connect battery to wire.
"""


def build_tokenizer(out_dir: str | Path):
    """Train a small byte-level BPE offline and save it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_causal_lm(out_dir: str | Path, *, hidden_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny Qwen2 causal LM plus tokenizer to ``out_dir`` and return the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(str(out))
    return out
