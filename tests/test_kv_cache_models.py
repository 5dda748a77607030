"""TieredKVCache.for_model on transformers families other than Llama: greedy tokens equal to
DynamicCache's, with the cache sized from the model's own config (GPT-2 names its sizes n_layer,
n_embd, n_head)."""

from __future__ import annotations

import pytest
import torch

from offload import TieredKVCache

tf = pytest.importorskip("transformers")
from tiny_families import tiny_causal_lm  # noqa: E402

# Gemma2's sliding window is shorter than the 28-token context, so its masked layers are exercised.
FAMILY_CONFIG = {"gemma2": {"sliding_window": 8}, "gpt2": {}, "qwen2": {}}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", sorted(FAMILY_CONFIG))
def test_greedy_tokens_equal_dynamic_cache(name):
    torch.manual_seed(0)
    model = tiny_causal_lm(name, layers=3, **FAMILY_CONFIG[name]).eval()
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
