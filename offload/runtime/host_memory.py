"""Host memory for the offload runtime: blocks by tensor class from a TieredAllocator (placed by
the policy's plan, pooled by its HostPool), viewable at byte offsets. It must not decide placement.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from allocators.host_buffer import HostBuffer
from allocators.tiered import DEFAULT_BUDGETS, Allocation, TieredAllocator
from allocators.topology import Topology


@dataclass(eq=False)
class HostBlock:
    """One allocation seen as bytes; :meth:`tensor` gives typed views at byte offsets.

    Every view must be gone before the block is released (the pool refuses otherwise).
    ``tier_shares`` is the fraction of its bytes per tier, e.g. ``{"dram": 0.5, "cxl": 0.5}``.
    """

    allocation: Allocation
    _bytes: torch.Tensor | None = field(repr=False)
    tier_shares: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.allocation.nbytes

    def tensor(
        self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0
    ) -> torch.Tensor:
        """A view of the block as ``dtype`` with ``shape``, starting ``offset_bytes`` in."""
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if self._bytes is None:
            raise ValueError("this host block was released; allocate a new one")
        if offset_bytes + nbytes > self.nbytes:
            raise ValueError(
                f"a {dtype} view of shape {tuple(shape)} at offset {offset_bytes} needs "
                f"{offset_bytes + nbytes} bytes; this block has {self.nbytes}"
            )
        return self._bytes[offset_bytes : offset_bytes + nbytes].view(dtype).view(shape)


@dataclass(frozen=True)
class HostFallbacks:
    """Host buffers that did not get what was asked for, counted once per buffer.

    ``unplaced_buffers``: the OS refused mbind (EPERM without CAP_SYS_NICE, ENOSYS), so their
    pages sit wherever the kernel put them. ``unpinned_buffers``: pinning was asked for and
    cudaHostRegister refused, so their copies are pageable (slower, synchronous). ``reasons``
    holds each distinct reason, as the buffers gave it; ``*_nbytes`` are those buffers' sizes.
    """

    unplaced_buffers: int = 0
    unpinned_buffers: int = 0
    unplaced_nbytes: int = 0
    unpinned_nbytes: int = 0
    reasons: tuple[str, ...] = ()


class HostMemory:
    """Allocate and release host blocks by tensor class; released blocks return to the pool.

    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> mem = HostMemory(topo, {"dram": "1GiB"}, pin=False)
    >>> block = mem.allocate("activations", 1024)
    >>> block.tensor(torch.float32, (16, 16)).shape
    torch.Size([16, 16])
    >>> mem.release(block); mem.allocate("activations", 1000) is not None
    True
    >>> mem.close(); mem.pool_stats().held_nbytes
    0
    """

    def __init__(
        self,
        topology: Topology,
        budgets: Mapping[str, int | str] | None = None,
        placements: Mapping[str, object] | None = None,
        *,
        pin: bool | None = None,
        allocator: TieredAllocator | None = None,
    ) -> None:
        # A given allocator (e.g. one rank's, seeing the tiers from its own GPU) is shared, so
        # one ledger holds every user's bytes; budgets, placements and pin are then its own.
        self.allocator = allocator or TieredAllocator(
            topology,
            budgets=dict(budgets or DEFAULT_BUDGETS),
            placements=placements,
            pin=torch.cuda.is_available() if pin is None else pin,
        )
        # Buffers already counted in fallbacks(); a pooled buffer handed out again counts once.
        self._seen_buffers: weakref.WeakSet = weakref.WeakSet()
        self._fallbacks = HostFallbacks()

    def allocate(self, tensor_class: str, nbytes: int) -> HostBlock:
        """A block of at least ``nbytes`` for ``tensor_class`` (pooled: reuse is cheap)."""
        allocation = self.allocator.allocate(tensor_class, max(int(nbytes), 1))
        self._count_fallbacks(allocation.buffer)
        node_tier = self.allocator.budgets.node_tier
        total = sum(allocation.nbytes_per_node.values()) or 1
        shares: dict[str, float] = {}
        for node, n in allocation.nbytes_per_node.items():
            tier = node_tier.get(node, "dram")
            shares[tier] = shares.get(tier, 0.0) + n / total
        view = allocation.tensor(torch.uint8, (allocation.nbytes,))
        return HostBlock(allocation, view, shares)

    def _count_fallbacks(self, buffer: HostBuffer) -> None:
        if buffer in self._seen_buffers:
            return
        self._seen_buffers.add(buffer)
        unplaced = not buffer.placement_enforced
        # pin_reason is None when pinned, "pin=False" or "CUDA is not available" when pinning
        # was not attempted; only a driver refusal is a fallback.
        reason = buffer.pin_reason
        unpinned = self.allocator.pin and not buffer.pinned and bool(reason)
        unpinned = unpinned and not str(reason).startswith("CUDA is not available")
        if not (unplaced or unpinned):
            return
        old = self._fallbacks
        new_reasons = [
            r
            for r, bad in ((buffer.fallback_reason, unplaced), (reason, unpinned))
            if bad and r and r not in old.reasons
        ]
        nbytes = buffer.nbytes
        self._fallbacks = HostFallbacks(
            unplaced_buffers=old.unplaced_buffers + unplaced,
            unpinned_buffers=old.unpinned_buffers + unpinned,
            unplaced_nbytes=old.unplaced_nbytes + nbytes * unplaced,
            unpinned_nbytes=old.unpinned_nbytes + nbytes * unpinned,
            reasons=old.reasons + tuple(new_reasons),
        )

    def fallbacks(self) -> HostFallbacks:
        """How many buffers were not placed (mbind refused) or not pinned (driver refused).

        >>> from allocators.topology import NumaNode
        >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
        >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
        >>> mem = HostMemory(topo, {"dram": "1GiB"}, pin=False)
        >>> mem.release(mem.allocate("grads", 4096)); mem.fallbacks().unplaced_buffers
        0
        >>> mem.close()
        """
        return self._fallbacks

    def release(self, block: HostBlock) -> None:
        """Give ``block`` back; views taken from it must be gone."""
        block._bytes = None
        try:
            self.allocator.release(block.allocation)
        except BufferError:
            # The last views may sit in a reference cycle only the collector frees (a caught
            # exception's frames): collect once before refusing.
            gc.collect()
            self.allocator.release(block.allocation)

    def tier_nbytes(self) -> dict[str, int]:
        """Bytes in use per host tier (pool caches not included)."""
        return {row.tier: row.used_nbytes for row in self.allocator.usage() if row.node is None}

    def pool_stats(self):
        """The pool's bytes held, in use and cached, hits and misses."""
        return self.allocator.backing.stats()

    def close(self, *, abandon_busy: bool = False) -> None:
        """Release every live block and empty the pool; with ``abandon_busy``, blocks still
        viewed (by an exception's frames) are freed with their last view instead of refused."""
        self.allocator.close(abandon_busy=abandon_busy)
