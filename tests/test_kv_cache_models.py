"""TieredKVCache.for_model on transformers families other than Llama: greedy tokens equal to
DynamicCache's, with the cache sized from the model's own config (GPT-2 names its sizes n_layer,
n_embd, n_head)."""

from __future__ import annotations

import pytest
import torch

from offload import TieredKVCache

tf = pytest.importorskip("transformers")

MODELS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=128)
    ),
    "gemma2-sliding": lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
        )
    ),
    "qwen2": lambda: tf.Qwen2ForCausalLM(
        tf.Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_tokens_equal_dynamic_cache(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = model.generate(
        ids,
        max_new_tokens=16,
        do_sample=False,
        past_key_values=tf.DynamicCache(config=model.config),
    )
    cache = TieredKVCache.for_model(
        model.config, max_context_tokens=64, budgets={"dram": "1GiB"}, dtype=torch.float32
    )
    with cache:
        got = model.generate(ids, max_new_tokens=16, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
