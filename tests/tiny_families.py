"""Tiny random-weight causal LMs of transformers families other than Llama, which tests share:
the same small sizes, so a family's own quirks (Gemma2's cache, GPT-2's config names) show up."""

from __future__ import annotations

import transformers as tf
from torch import nn

FAMILIES = ("gemma2", "gpt2", "qwen2")


def tiny_causal_lm(family: str, layers: int, **config) -> nn.Module:
    """A ``family`` model with ``layers`` layers, vocab 256, hidden 64, 4 heads (2 KV heads where
    the family has them); ``config`` adds or overrides config fields (e.g. ``sliding_window``)."""
    if family == "gpt2":
        sizes = dict(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
        return tf.GPT2LMHeadModel(tf.GPT2Config(**{**sizes, **config}))
    sizes = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**sizes, "head_dim": 16, **config}))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**sizes, **config}))
    raise ValueError(f"family = {family!r}; write one of {FAMILIES}")
