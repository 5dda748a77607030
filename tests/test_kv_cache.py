"""TieredKVCache on CPU: same tokens as DynamicCache, block store, per-tier accounting, limits,
and caches built from a model config and a policy (for_model) that hold where the plan says."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from allocators.errors import BudgetExceededError
from allocators.placement import as_placement
from allocators.tiered import TieredAllocator
from allocators.topology import NumaNode, Topology
from offload.kv_cache.cache import TieredKVCache, check_transformers_version
from offload.planning.model_shapes import MODELS
from offload.runtime.host_memory import HostMemory
from offload.tools.tiny_finetune import tiny_llama

BLOCK_TOKENS = 16
PROMPT_TOKENS = 37  # more than two blocks
NEW_TOKENS = 20  # crosses the block boundaries at 48 and 64


def one_node() -> Topology:
    node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    return Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="test machine")


def dram_and_cxl() -> Topology:
    dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 34, free_bytes=1 << 33)
    distances = {0: {0: 10, 1: 20}, 1: {0: 20, 1: 10}}
    return Topology(nodes=(dram, cxl), distances=distances, gpus=(), source="test dram+cxl")


class MemoryBuffer:
    """Ordinary memory standing in for a placed buffer (node 1 does not exist here)."""

    def __init__(self, nbytes: int):
        self.nbytes = -(-nbytes // 4096) * 4096
        self._memory = torch.zeros(self.nbytes, dtype=torch.uint8)

    def tensor(self, dtype, shape, offset_bytes=0):
        count = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return self._memory[offset_bytes : offset_bytes + count].view(dtype).view(shape)


class MemoryBacking:
    chunk_nbytes = 2 << 20

    def __init__(self):
        self.live = 0

    def size_for(self, nbytes):
        return -(-nbytes // 4096) * 4096

    def acquire(self, nbytes, placement, pin=True, room_nbytes=None):
        self.live += 1
        return MemoryBuffer(nbytes)

    def release(self, buffer):
        self.live -= 1


def prompt(batch: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(
        0, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(3)
    )


def generate(model, ids, cache, **kwargs) -> torch.Tensor:
    with warnings.catch_warnings():
        # transformers 5.24 renames past_key_values to cache; 5.17 knows only the old name.
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache, **kwargs
        )


@pytest.fixture(scope="module")
def models():
    return {layers: tiny_llama(0, hidden=64, layers=layers, vocab=128).eval() for layers in (2, 3)}


@pytest.mark.parametrize(("layers", "hbm_layers"), [(2, 1), (3, 2), (2, 2), (3, 3)])
def test_greedy_tokens_match_dynamic_cache(models, layers, hbm_layers):
    model, ids = models[layers], prompt()
    expected = generate(model, ids, DynamicCache())
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS, hbm_layers=hbm_layers) as c:
        assert torch.equal(generate(model, ids, c), expected)
        stats = c.stats()
    assert stats.stored_tokens == PROMPT_TOKENS + NEW_TOKENS - 1
    if layers > hbm_layers > 1:
        assert stats.prefetched_loads > stats.blocking_loads
    if hbm_layers >= layers:
        assert stats.h2d_nbytes == 0  # every layer keeps its device slot: nothing comes back


def test_greedy_tokens_match_with_one_kv_head_and_batch_two():
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = prompt(batch=2)
    expected = generate(model, ids, DynamicCache())
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS) as cache:
        assert torch.equal(generate(model, ids, cache), expected)
        assert cache.layers[0].block_shape == (2, 2, 1, BLOCK_TOKENS, 8)


def test_beam_search_matches_dynamic_cache(models):
    model, ids = models[2], prompt()
    expected = generate(model, ids, DynamicCache(), num_beams=2)
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS, hbm_layers=1) as cache:
        assert torch.equal(generate(model, ids, cache, num_beams=2), expected)


def test_host_bytes_per_tier_match_the_blocks_stored(models):
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS) as cache:
        generate(models[2], prompt(), cache)
        tokens = PROMPT_TOKENS + NEW_TOKENS - 1
        n_blocks = -(-tokens // BLOCK_TOKENS)
        layer = cache.layers[0]
        assert layer.block_nbytes == 2 * 1 * 2 * BLOCK_TOKENS * 16 * 4  # K+V, B, kv heads, D, fp32
        assert [len(lay.blocks) for lay in cache.layers] == [n_blocks, n_blocks]
        charged = sum(b.allocation.charged_nbytes for lay in cache.layers for b in lay.blocks)
        assert cache.tier_nbytes() == {"dram": charged}
        assert charged >= 2 * n_blocks * layer.block_nbytes
        assert mem.tier_nbytes()["dram"] == charged


def test_growing_never_moves_the_stored_blocks():
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=4) as cache:
        cache.update(torch.ones(1, 1, 6, 2), torch.ones(1, 1, 6, 2), 0)
        first = [block.view.data_ptr() for block in cache.layers[0].blocks]
        for step in range(5):
            k = torch.full((1, 1, 1, 2), float(step))
            keys, _ = cache.update(k, k, 0)
        assert [b.view.data_ptr() for b in cache.layers[0].blocks][:2] == first
        assert keys.shape == (1, 1, 11, 2)
        assert keys[0, 0, 6:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert cache.layers[0].blocks[2].view[0, 0, 0, :3, 0].tolist() == [2.0, 3.0, 4.0]


def test_full_tier_raises_naming_tier_budget_and_request(models):
    mem = HostMemory(one_node(), {"dram": "8KiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS) as cache:
        with pytest.raises(BudgetExceededError) as info:
            generate(models[2], prompt(), cache)
    message = str(info.value)
    assert "KV cache layer" in message and "kv_cache request" in message
    assert "tier 'dram' has a budget of 8.00 KiB" in message
    assert "on_full='spill'" in message


def test_spill_puts_blocks_on_the_next_tier_and_keeps_tokens(models):
    model, ids = models[2], prompt()
    expected = generate(model, ids, DynamicCache())
    backing = MemoryBacking()
    allocator = TieredAllocator(
        dram_and_cxl(), {"dram": "16KiB", "cxl": "1MiB"}, backing=backing, pin=False
    )
    with TieredKVCache(
        allocator, device="cpu", block_tokens=BLOCK_TOKENS, placement=0, on_full="spill"
    ) as cache:
        assert torch.equal(generate(model, ids, cache), expected)
        by_tier = cache.tier_nbytes()
        assert by_tier["dram"] == 16 * 1024
        assert by_tier["cxl"] > 0
        used = {row.tier: row.used_nbytes_by_class["kv_cache"] for row in allocator.usage()}
        assert used == {"dram": by_tier["dram"], "cxl": by_tier["cxl"]}
    assert backing.live == 0


def test_spill_with_every_tier_full_says_so():
    allocator = TieredAllocator(
        dram_and_cxl(), {"dram": "4KiB", "cxl": "4KiB"}, backing=MemoryBacking(), pin=False
    )
    with TieredKVCache(allocator, device="cpu", block_tokens=64, on_full="spill") as cache:
        with pytest.raises(BudgetExceededError, match="every budgeted tier is full"):
            cache.update(torch.ones(1, 2, 8, 16), torch.ones(1, 2, 8, 16), 0)


def test_close_gives_every_block_back_and_refuses_later_updates(models):
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    cache = TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS)
    generate(models[2], prompt(), cache)
    assert mem.pool_stats().in_use_nbytes > 0
    cache.close()
    cache.close()
    assert mem.pool_stats().in_use_nbytes == 0
    assert cache.tier_nbytes() == {} and cache.device_nbytes() == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.update(torch.ones(1, 2, 1, 16), torch.ones(1, 2, 1, 16), 0)


def test_crop_and_reset_release_trailing_blocks():
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=4) as cache:
        values = torch.arange(10.0).view(1, 1, 10, 1)
        cache.update(values, values, 0)
        cache.crop(-5)
        assert cache.get_seq_length() == 5 and len(cache.layers[0].blocks) == 2
        keys, _ = cache.update(values[:, :, :1], values[:, :, :1], 0)
        assert keys[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 0.0]
        with pytest.raises(ValueError, match="negative"):
            cache.crop(3)
        cache.reset()
        assert cache.get_seq_length() == 0 and mem.pool_stats().in_use_nbytes == 0


def test_batch_changes_raise_naming_the_alternative():
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu") as cache:
        cache.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), 0)
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            cache.batch_repeat_interleave(2)
        with pytest.raises(ValueError, match="new TieredKVCache"):
            cache.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hbm_layers": 0}, "hbm_layers = 0"),
        ({"block_tokens": 1.5}, "block_tokens"),
        ({"on_full": "drop"}, "on_full = 'drop'"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    mem = HostMemory(one_node(), {"dram": "1MiB"}, pin=False)
    with pytest.raises(ValueError, match=match):
        TieredKVCache(mem, device="cpu", **kwargs)


def test_unsupported_transformers_is_refused():
    with pytest.raises(RuntimeError, match="transformers 5.x"):
        check_transformers_version("4.57.1")


def test_mask_sizes_count_stored_tokens_and_the_query():
    mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=4) as cache:
        cache.update(torch.ones(1, 1, 5, 2), torch.ones(1, 1, 5, 2), 0)
        assert cache.get_mask_sizes(3, 0) == (8, 0)
        # earlier 5.x releases pass the query's cache positions
        assert cache.layers[0].get_mask_sizes(torch.arange(5, 8)) == (8, 0)


def test_exported_from_the_package():
    import offload

    assert offload.TieredKVCache is TieredKVCache


def two_cxl_nodes() -> Topology:
    dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    cxl = [
        NumaNode(id=i, kind="cxl", cpus=(), total_bytes=1 << 34, free_bytes=1 << 33) for i in (1, 2)
    ]
    nodes = (dram, *cxl)
    distances = {a.id: {b.id: 10 if a is b else 20 for b in nodes} for a in nodes}
    return Topology(nodes=nodes, distances=distances, gpus=(), source="test dram+2cxl")


@pytest.mark.parametrize("policy", ["local_only", "naive_interleave", "cxl_aware"])
def test_every_paper_policy_places_the_cache_on_this_machines_dram(models, policy):
    with TieredKVCache.for_model(
        models[2].config,
        max_context_tokens=64,
        policy=policy,
        budgets={"dram": "64MiB"},
        device="cpu",
        pin=False,
    ) as cache:
        assert cache.plan.policy == policy and cache.placement == as_placement(0)


def test_for_model_places_the_blocks_on_this_machines_dram_and_keeps_the_tokens(models):
    model, ids = models[2], prompt()
    expected = generate(model, ids, DynamicCache())
    cache = TieredKVCache.for_model(
        model.config,
        max_context_tokens=PROMPT_TOKENS + NEW_TOKENS,
        policy="planned",
        budgets={"dram": "64MiB"},
        dtype=torch.float32,
        device="cpu",
        block_tokens=BLOCK_TOKENS,
        pin=False,
    )
    with cache:
        assert cache.plan.policy == "planned" and cache.placement == as_placement(0)
        assert cache.allocator.placements["kv_cache"] == cache.placement
        assert torch.equal(generate(model, ids, cache), expected)
        for layer in cache.layers:
            for block in layer.blocks:
                pages = block.allocation.buffer.pages_per_node()
                assert set(pages) == {0}, pages
    assert cache.allocator.live_allocations == ()
    with pytest.raises(ValueError, match="closed"):  # the cache's own allocator closed with it
        cache.allocator.allocate("kv_cache", 4096)


@pytest.mark.parametrize(
    ("topology", "expected"),
    [
        # 7 GiB of KV (qwen2.5-7b at 128K): 2 GiB of DRAM left, the rest on the card(s).
        ("paper-1aic", [(0, 2 / 7), (1, 5 / 7)]),
        ("paper-2aic", [(0, 2 / 7), (1, 2.5 / 7), (2, 2.5 / 7)]),
    ],
)
def test_for_model_on_a_declared_machine_takes_the_policys_placement(topology, expected):
    cache = TieredKVCache.for_model(
        "qwen2.5-7b",
        max_context_tokens=131072,
        policy="cxl_aware",
        topology=topology,
        budgets={"dram": "2GiB", "cxl": "64GiB"},
        device="cpu",
        pin=False,
    )
    with cache:
        assert cache.placement == as_placement(expected)
        assert cache.allocator.placements["kv_cache"] == cache.placement
        assert cache.plan.result.groups[0].nbytes_per_node[0] == 2 << 30


def test_for_model_takes_a_config_dict_a_shape_or_a_name_and_refuses_anything_else():
    kwargs = {"max_context_tokens": 4096, "budgets": {"dram": "1GiB"}, "device": "cpu"}
    config = tiny_llama(0, hidden=64, layers=2, vocab=128).config
    plans = [
        TieredKVCache.for_model(spec, pin=False, **kwargs)
        for spec in (config, config.to_dict(), MODELS["llama-1.1b"], "llama-1.1b")
    ]
    assert [p.plan.result.groups[0].group.nbytes for p in plans] == [
        4 * 2 * 2 * 16 * 4096,  # 2 layers, 2 KV heads, head dim 16, bf16
        4 * 2 * 2 * 16 * 4096,
        4 * 22 * 4 * 64 * 4096,
        4 * 22 * 4 * 64 * 4096,
    ]
    for cache in plans:
        cache.close()
    with pytest.raises(TypeError, match="model.config"):
        TieredKVCache.for_model(42, **kwargs)


def test_for_model_refuses_a_context_the_budgets_cannot_hold():
    with pytest.raises(BudgetExceededError, match="shorten the context"):
        TieredKVCache.for_model(
            "qwen2.5-7b",
            max_context_tokens=131072,
            topology="paper-1aic",
            budgets={"dram": "1GiB", "cxl": "1GiB"},
            device="cpu",
        )


def test_blocks_follow_the_plans_shares_over_dram_and_cxl(models):
    # Blocks are 4 KiB here, far below the allocator's 2 MiB stripe chunk: each goes whole to
    # the node furthest behind its share, so a 1:3 plan holds 1:3 of the bytes (within a block).
    model, ids = models[3], prompt()
    expected = generate(model, ids, DynamicCache())
    allocator = TieredAllocator(
        dram_and_cxl(),
        {"dram": "1MiB", "cxl": "1MiB"},
        placements={"kv_cache": [(0, 1), (1, 3)]},
        backing=MemoryBacking(),
        pin=False,
    )
    with TieredKVCache(allocator, device="cpu", block_tokens=BLOCK_TOKENS) as cache:
        assert torch.equal(generate(model, ids, cache), expected)
        by_tier = cache.tier_nbytes()
        block = cache.layers[0].block_nbytes
        # One block off its share moves cxl - 3 * dram by 4 blocks.
        assert abs(by_tier["cxl"] - 3 * by_tier["dram"]) <= 4 * block, by_tier


def test_spill_goes_node_by_node_so_a_full_card_passes_blocks_to_the_next():
    allocator = TieredAllocator(
        two_cxl_nodes(),
        {"dram": "8KiB", "cxl": {1: "8KiB", 2: "1MiB"}},
        backing=MemoryBacking(),
        pin=False,
    )
    with TieredKVCache(allocator, device="cpu", block_tokens=64, on_full="spill") as cache:
        # 8 KiB blocks (K+V x 1 x 2 heads x 64 tokens x 8 x fp32): 8 of them for 512 tokens.
        cache.update(torch.ones(1, 2, 512, 8), torch.ones(1, 2, 512, 8), 0)
        per_node = {
            row.node: row.used_nbytes_by_class["kv_cache"]
            for row in allocator.usage()
            if row.node is not None
        }
    assert per_node == {0: 8192, 1: 8192, 2: 6 * 8192}


def test_slots_beyond_two_keep_layers_resident_and_stream_fewer():
    """Four layers: two slots bring all four back each token; three slots keep layer 0 on the
    device and bring three back, with the same tokens as DynamicCache."""
    model, ids = tiny_llama(0, hidden=64, layers=4, vocab=128).eval(), prompt()
    expected = generate(model, ids, DynamicCache())
    loads = {}
    for slots in (2, 3):
        mem = HostMemory(one_node(), {"dram": "64MiB"}, pin=False)
        with TieredKVCache(mem, device="cpu", block_tokens=BLOCK_TOKENS, hbm_layers=slots) as c:
            assert torch.equal(generate(model, ids, c), expected)
            stats = c.stats()
        loads[slots] = stats.prefetched_loads + stats.blocking_loads
    # The prompt loads the 4 layers once; each decode step after it loads 4 layers with 2 slots
    # and 3 with 3; the last layer of the last step prefetches one layer for a step not taken.
    decode_steps = NEW_TOKENS - 1
    assert loads == {2: 4 + 4 * decode_steps + 1, 3: 4 + 3 * decode_steps + 1}
