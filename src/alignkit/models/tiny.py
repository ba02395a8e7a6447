"""Tiny random-init models and a character-level ChatML tokenizer for tests.

Everything here is built from a config in memory (no download), small enough that a
full training step takes milliseconds on a CPU, and saved/loaded with plain
``from_pretrained`` like any user checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad/unk=0, bos=1, eos=2 (as SmolLM2)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML special tokens.

    pad (``<|endoftext|>``, id 0) differs from eos (``<|im_end|>``, id 2), as in the embedded model.
    """
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_labels: int | None = None) -> LlamaConfig:
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        **kwargs,
    )


def tiny_causal_lm(seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tok), hidden_size, num_layers))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model, tok


def tiny_reward_model(seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(len(tok), hidden_size, num_layers, num_labels=1))
    return model, tok


def save_tiny_random(out: str | Path, seed: int = 0) -> Path:
    """The built-in ``tiny-random`` model (``model.name_or_path=tiny-random``): a tiny causal LM + tokenizer in
    ``out``; a reward model loads it as a sequence classifier with a fresh head."""
    model, tok = tiny_causal_lm(seed)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return Path(out)


def save_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write a tiny policy and a tiny reward model under ``root``; returns their paths.

    Used by end-to-end tests so that CLI runs load them exactly as a user's checkpoint.
    """
    root = Path(root)
    paths = {"policy": root / "tiny-policy", "reward": root / "tiny-reward"}
    policy, tok = tiny_causal_lm(seed)
    policy.save_pretrained(paths["policy"])
    tok.save_pretrained(paths["policy"])
    rm, tok = tiny_reward_model(seed + 1)
    rm.save_pretrained(paths["reward"])
    tok.save_pretrained(paths["reward"])
    return paths
