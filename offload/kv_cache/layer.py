"""One layer's KV cache as fixed-size token blocks in placed host buffers (tensor class kv_cache),
charged to the TieredAllocator's tiers and spread over the given placement's nodes block by block.
It must not move data to the device or pick placements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers.cache_utils import CacheLayerMixin

from allocators.errors import BudgetExceededError
from allocators.placement import Placement, as_placement
from allocators.tiered import Allocation, TieredAllocator
from allocators.units import format_bytes

OnFull = Literal["error", "spill"]
ON_FULL_CHOICES: tuple[OnFull, ...] = ("error", "spill")


@dataclass(eq=False)
class KVBlock:
    """``block_tokens`` tokens of K and V for one layer: a host view of shape [2, B, H, T, D]."""

    allocation: Allocation
    view: torch.Tensor = field(repr=False)
    tier_shares: dict[str, float]


class BlockPlacer:
    """Spreads a cache's blocks over its placement's nodes, whole blocks at a time, so the bytes
    per node follow the placement's shares within one block.

    Why whole blocks: the allocator stripes a buffer in 2 MiB chunks, so a block smaller than
    that would land wholly on the placement's first node, and a 1:1 plan would end up all on
    DRAM. Each new block goes to the node furthest behind its share of what is placed so far.

    >>> placer = BlockPlacer(as_placement([(0, 1), (1, 3)]))
    >>> order = []
    >>> for _ in range(4):
    ...     node = placer.candidates()[0].nodes[0]
    ...     placer.add({node: 100}); order.append(node)
    >>> order, placer.nbytes_per_node
    ([1, 0, 1, 1], {0: 100, 1: 300})
    """

    def __init__(self, placement: Placement) -> None:
        self.placement = placement
        self.nbytes_per_node: dict[int, int] = dict.fromkeys(placement.nodes, 0)

    def candidates(self) -> list[Placement]:
        """The placement's nodes, one each, the node furthest behind its share first."""
        total = sum(self.nbytes_per_node.get(n, 0) for n in self.placement.nodes)
        order = sorted(
            self.placement.shares,
            # Ties (an empty cache) go to the largest share.
            key=lambda s: (self.nbytes_per_node.get(s[0], 0) - s[1] * total, -s[1]),
        )
        return [as_placement(node) for node, _ in order]

    def add(self, nbytes_per_node: dict[int, int]) -> None:
        """Count a block placed (its charged bytes per node)."""
        for node, n in nbytes_per_node.items():
            self.nbytes_per_node[node] = self.nbytes_per_node.get(node, 0) + n

    def remove(self, nbytes_per_node: dict[int, int]) -> None:
        """Count a block given back."""
        for node, n in nbytes_per_node.items():
            self.nbytes_per_node[node] -= n


def spill_placements(allocator: TieredAllocator, planned: Placement) -> list[Placement]:
    """The planned placement, then each budgeted node alone, tier by tier (DRAM, remote DRAM, CXL).

    A block that does not fit where the plan puts it is tried on each next node in that order;
    one node at a time, since a block under the stripe chunk lands wholly on one node anyway.

    >>> from allocators.topology import NumaNode, Topology
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> alloc = TieredAllocator(topo, {"dram": "1GiB"}, pin=False)
    >>> [p.nodes for p in spill_placements(alloc, as_placement(0))]
    [(0,)]
    """
    tiers = allocator.tiers
    candidates = [planned]
    for nodes in (tiers.local_dram, tiers.remote_dram, tiers.cxl):
        for node in nodes:
            placement = as_placement(node.id)
            if node.id in allocator.budgets.node_nbytes and placement not in candidates:
                candidates.append(placement)
    return candidates


def allocate_block(
    allocator: TieredAllocator,
    nbytes: int,
    placement: Placement | BlockPlacer,
    on_full: OnFull,
    what: str,
) -> Allocation:
    """One kv_cache buffer of ``nbytes`` on ``placement``, or on the next tiers with "spill".

    With a BlockPlacer the block goes wholly to one of its placement's nodes, the one furthest
    behind its share first, then the others (a full node passes the block on within the plan);
    the placer counts the block. Raises BudgetExceededError naming the block, its size and
    every refusal.

    >>> from allocators.topology import NumaNode, Topology
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> with TieredAllocator(topo, {"dram": "1MiB"}, pin=False) as alloc:
    ...     allocate_block(alloc, 1 << 21, as_placement(0), "error", "layer 0 block 0")
    Traceback (most recent call last):
    ...
    allocators.errors.BudgetExceededError: KV cache layer 0 block 0 (2.00 MiB) ...
    """
    placer = placement if isinstance(placement, BlockPlacer) else None
    planned = placer.placement if placer else placement
    candidates = placer.candidates() if placer else [planned]
    if on_full == "spill":
        candidates += [p for p in spill_placements(allocator, planned) if p not in candidates]
    refusals = []
    for candidate in candidates:
        try:
            allocation = allocator.allocate("kv_cache", nbytes, candidate)
        except BudgetExceededError as exc:
            refusals.append(f"on {candidate}: {exc}")
            continue
        if placer:
            placer.add(allocation.nbytes_per_node)
        return allocation
    hint = (
        "raise the budget of the tier named above, shorten the context, or pass on_full='spill' "
        "to use the next tier"
        if on_full == "error"
        else "every budgeted tier is full; raise a tier's budget or shorten the context"
    )
    raise BudgetExceededError(
        f"KV cache {what} ({format_bytes(nbytes)}) does not fit: {' | '.join(refusals)}; {hint}"
    )


class TieredKVLayer(CacheLayerMixin):
    """The host block store of one attention layer; TieredKVCache moves the data.

    ``length`` tokens are stored, token ``t`` in block ``t // block_tokens``; blocks are only
    added or dropped at the end, so the past is never reallocated or copied.

    >>> from allocators.topology import NumaNode, Topology
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> alloc = TieredAllocator(topo, {"dram": "1GiB"}, pin=False)
    >>> layer = TieredKVLayer(alloc, as_placement(0), block_tokens=256, on_full="error",
    ...                       layer_idx=0)
    >>> layer.lazy_initialization(torch.zeros(1, 4, 0, 64), torch.zeros(1, 4, 0, 64))
    >>> layer.block_nbytes, layer.n_blocks_for(300)
    (524288, 2)
    >>> layer.ensure_blocks(300); layer.tier_nbytes()
    {'dram': 1048576}
    >>> layer.reset(); alloc.close()
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        allocator: TieredAllocator,
        placement: Placement | BlockPlacer,
        block_tokens: int,
        on_full: OnFull,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.allocator = allocator
        # Layers of one cache share its placer, so the shares hold over all of its blocks.
        self.placer = placement if isinstance(placement, BlockPlacer) else BlockPlacer(placement)
        self.block_tokens = block_tokens
        self.on_full = on_full
        self.layer_idx = layer_idx
        self.blocks: list[KVBlock] = []
        self.length = 0
        self.block_shape: tuple[int, ...] = ()
        self.dtype: torch.dtype | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Fix the block shape [2, batch, kv_heads, block_tokens, head_dim] and dtype."""
        if key_states.shape != value_states.shape or key_states.dtype != value_states.dtype:
            raise ValueError(
                f"keys {tuple(key_states.shape)} {key_states.dtype} and values "
                f"{tuple(value_states.shape)} {value_states.dtype} differ; TieredKVCache "
                "stores K and V of the same shape and dtype (use DynamicCache for MLA-style models)"
            )
        batch, heads, _, head_dim = key_states.shape
        self.block_shape = (2, batch, heads, self.block_tokens, head_dim)
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    @property
    def block_nbytes(self) -> int:
        count = 1
        for dim in self.block_shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()

    @property
    def batch_size(self) -> int:
        return self.block_shape[1] if self.block_shape else -1

    def n_blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.block_tokens)

    def ensure_blocks(self, tokens: int) -> None:
        """Add host blocks at the end until ``tokens`` tokens fit."""
        node_tier = self.allocator.budgets.node_tier
        while len(self.blocks) < self.n_blocks_for(tokens):
            what = f"layer {self.layer_idx} block {len(self.blocks)}"
            allocation = allocate_block(
                self.allocator, self.block_nbytes, self.placer, self.on_full, what
            )
            total = sum(allocation.nbytes_per_node.values()) or 1
            shares: dict[str, float] = {}
            for node, n in allocation.nbytes_per_node.items():
                tier = node_tier.get(node, "dram")
                shares[tier] = shares.get(tier, 0.0) + n / total
            # No local name for the view: a traceback holding this frame would keep it alive
            # and make the pool refuse the block at close().
            self.blocks.append(
                KVBlock(allocation, allocation.tensor(self.dtype, self.block_shape), shares)
            )

    def tier_nbytes(self) -> dict[str, int]:
        """Bytes charged per host tier for this layer's blocks."""
        node_tier = self.allocator.budgets.node_tier
        out: dict[str, int] = {}
        for block in self.blocks:
            for node, n in block.allocation.nbytes_per_node.items():
                tier = node_tier.get(node, "dram")
                out[tier] = out.get(tier, 0) + n
        return out

    def release_blocks_from(self, first: int) -> None:
        """Give blocks ``first`` and later back to the allocator."""
        dropped, self.blocks = self.blocks[first:], self.blocks[:first]
        for block in dropped:
            block.view = None
            self.allocator.release(block.allocation)
            self.placer.remove(block.allocation.nbytes_per_node)

    def update(self, key_states, value_states, *args, **kwargs):
        """Not used: TieredKVCache.update moves the data of all layers (it owns the streams)."""
        raise NotImplementedError(
            "TieredKVLayer.update is not called directly; call TieredKVCache.update(k, v, layer_idx)"
        )

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """(kv_length, kv_offset) for the attention mask: all stored tokens plus the query.

        Earlier 5.x releases pass the query's cache positions (a tensor) instead of its length.
        """
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens stored."""
        return self.length

    def get_max_length(self) -> int:
        """No maximum: blocks are added as the context grows (bounded by the tier budgets)."""
        return -1

    # The name of get_max_length in earlier 5.x releases.
    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        """Drop every token and give the blocks back to the pool (shape is kept)."""
        self.release_blocks_from(0)
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}) is not supported; pass a negative number of tokens "
                "to remove, e.g. crop(-4)"
            )
        self.length = max(self.length + tokens_to_remove, 0)
        self.release_blocks_from(self.n_blocks_for(self.length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search) in place in the host blocks."""
        for block in self.blocks:
            block.view.copy_(block.view.index_select(1, beam_idx.to("cpu")))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Not supported: the batch size is fixed by the block shape."""
        raise NotImplementedError(
            "TieredKVCache has a fixed batch size per block; for contrastive search or "
            "num_return_sequences > 1 with a shared prompt, use DynamicCache"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Not supported: the batch size is fixed by the block shape."""
        self.batch_repeat_interleave(0)
