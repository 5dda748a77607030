"""Host memory for the offload runtime: long-lived blocks (masters, grads) and pooled blocks
(activations, staging) by tensor class, with the bytes held per tier. It must not decide placement.

INTERIM: until allocators.tiered (TieredAllocator) and allocators.host_pool (HostPool) land, blocks
come from ``_InterimBackend`` (torch host tensors, pinned when CUDA is present, counted as "dram").
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from allocators.tensor_classes import check_tensor_class


@dataclass(eq=False)
class HostBlock:
    """A host buffer of ``nbytes`` for one tensor class; view it with :meth:`tensor`.

    >>> mem = HostMemory()
    >>> block = mem.allocate("master_params", 16)
    >>> block.tensor(torch.float32, (2, 2)).shape
    torch.Size([2, 2])
    >>> mem.release(block)
    """

    tensor_class: str
    nbytes: int
    tier_nbytes: dict[str, int]
    _storage: torch.Tensor = field(repr=False)
    pooled: bool = False

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0):
        """A view of the block as ``dtype`` with ``shape``, starting ``offset_bytes`` in."""
        count = 1
        for dim in shape:
            count *= dim
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset_bytes + nbytes > self.nbytes:
            raise ValueError(
                f"a {dtype} view of shape {tuple(shape)} at offset {offset_bytes} needs "
                f"{offset_bytes + nbytes} bytes; this block has {self.nbytes}"
            )
        return self._storage[offset_bytes : offset_bytes + nbytes].view(dtype).view(shape)


class _InterimBackend:
    """INTERIM stand-in for TieredAllocator + HostPool: unplaced torch host tensors."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin

    def allocate(self, tensor_class: str, nbytes: int) -> HostBlock:
        storage = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        return HostBlock(tensor_class, nbytes, {"dram": nbytes}, storage)

    def free(self, block: HostBlock) -> None:
        block._storage = torch.empty(0, dtype=torch.uint8)


class HostMemory:
    """Blocks by tensor class; pooled blocks are kept for reuse by (class, size) until close().

    >>> mem = HostMemory()
    >>> a = mem.acquire("activations", 1024); mem.release(a)
    >>> mem.acquire("activations", 1024) is a, mem.stats()["pool_hits"]
    (True, 1)
    >>> mem.close(); mem.stats()["held_nbytes"]
    0
    """

    def __init__(self, policy: str = "cxl_aware", budgets: dict[str, int] | None = None) -> None:
        self.policy = policy
        self.budgets = dict(budgets or {})
        self._backend = _InterimBackend(pin=torch.cuda.is_available())
        self._free: dict[tuple[str, int], list[HostBlock]] = defaultdict(list)
        self._live: set[int] = set()
        self._held: dict[int, HostBlock] = {}
        self._hits = 0
        self._misses = 0
        # Bucket workers take staging blocks while the autograd thread packs activations.
        self._lock = threading.Lock()

    def allocate(self, tensor_class: str, nbytes: int) -> HostBlock:
        """A block held until :meth:`release` (masters, host grads)."""
        check_tensor_class(tensor_class)
        block = self._backend.allocate(tensor_class, nbytes)
        with self._lock:
            self._held[id(block)] = block
            self._live.add(id(block))
        return block

    def acquire(self, tensor_class: str, nbytes: int) -> HostBlock:
        """A pooled block: reused from an earlier :meth:`release` of the same class and size."""
        check_tensor_class(tensor_class)
        with self._lock:
            cached = self._free.get((tensor_class, nbytes))
            block = cached.pop() if cached else None
            if block is not None:
                self._hits += 1
                self._live.add(id(block))
                return block
            self._misses += 1
        block = self._backend.allocate(tensor_class, nbytes)
        block.pooled = True
        with self._lock:
            self._held[id(block)] = block
            self._live.add(id(block))
        return block

    def release(self, block: HostBlock) -> None:
        """Give a block back: pooled blocks wait for reuse, others are freed."""
        with self._lock:
            if id(block) not in self._live:
                raise ValueError("this host block was already released or is not from this memory")
            self._live.discard(id(block))
            if block.pooled:
                self._free[(block.tensor_class, block.nbytes)].append(block)
                return
            del self._held[id(block)]
        self._backend.free(block)

    def tier_nbytes(self) -> dict[str, int]:
        """Bytes held per host tier, pooled blocks included."""
        totals: dict[str, int] = defaultdict(int)
        with self._lock:
            for block in self._held.values():
                for tier, n in block.tier_nbytes.items():
                    totals[tier] += n
        return dict(totals)

    def stats(self) -> dict[str, int]:
        """Blocks and bytes held and in use, pool hits and misses."""
        with self._lock:
            return {
                "held_nbytes": sum(b.nbytes for b in self._held.values()),
                "in_use_nbytes": sum(self._held[i].nbytes for i in self._live if i in self._held),
                "live_blocks": len(self._live),
                "pool_hits": self._hits,
                "pool_misses": self._misses,
            }

    def close(self) -> None:
        """Free every block, in use or pooled; blocks handed out must not be used afterwards."""
        with self._lock:
            blocks = list(self._held.values())
            self._held.clear()
            self._free.clear()
            self._live.clear()
        for block in blocks:
            self._backend.free(block)
