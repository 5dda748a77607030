"""Checkpoint offload (activations="checkpoint") on transformers models other than Llama: the same
losses as plain training. Gemma2's layers append to a KV cache in a training forward, which the
replay in backward appended again until wrapped layers ran without a cache."""

from __future__ import annotations

import pytest
import torch

import offload
from allocators.sysfs_topology import discover
from offload.tiny_finetune import train_steps

tf = pytest.importorskip("transformers")

MODELS = {
    "gemma2": lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    ),
    "qwen2": lambda: tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    ),
}


def _losses(name: str, offloaded: bool) -> tuple[float, ...]:
    torch.manual_seed(0)
    model = MODELS[name]().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    if not offloaded:
        return train_steps(model, opt, [ids] * 4)
    sess = offload.enable(
        model, opt, topology=discover(), budgets={"dram": "1GiB"}, activations="checkpoint"
    )
    try:
        return train_steps(model, opt, [ids] * 4)
    finally:
        sess.disable()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_offload_trains_like_plain_torch(name):
    assert _losses(name, True) == pytest.approx(_losses(name, False), rel=1e-6, abs=1e-6)
