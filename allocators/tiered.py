"""TieredAllocator: host buffers by tensor class, placed per plan and charged per tier and node
against budgets. It refuses before touching memory; it must not decide placements (policies do).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from allocators.errors import BudgetExceededError
from allocators.host_pool import HostPool
from allocators.placement import Placement, as_placement
from allocators.policies import TIER_NAMES, Budgets, BudgetSpec, TierName, parse_budgets
from allocators.striping import split_nbytes
from allocators.tensor_classes import TENSOR_CLASSES, TensorClass, check_tensor_class
from allocators.topology import Topology
from allocators.units import format_bytes

if TYPE_CHECKING:
    import pandas as pd
    import torch

DEFAULT_BUDGETS: Mapping[str, str] = {"dram": "64GiB", "cxl": "256GiB"}


class HostBufferLike(Protocol):
    """What the allocator needs of a buffer: its real (page-rounded) size and tensor views."""

    nbytes: int

    def tensor(
        self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0
    ) -> torch.Tensor: ...


class Backing(Protocol):
    """Where memory comes from: what allocators.host_pool.HostPool offers the allocator.

    ``size_for(nbytes)`` is the bytes it maps for a request and ``chunk_nbytes`` its stripe
    chunk, so budgets are charged exactly before any memory is touched; ``room_nbytes`` (node ->
    bytes the budget leaves) bounds what it may keep cached there.
    """

    chunk_nbytes: int

    def size_for(self, nbytes: int) -> int: ...

    def acquire(
        self,
        nbytes: int,
        placement: Placement,
        pin: bool = True,
        *,
        room_nbytes: Mapping[int, int] | None = None,
    ) -> HostBufferLike: ...

    def release(self, buffer: HostBufferLike) -> None: ...

    def abandon(self, buffer: HostBufferLike) -> None:
        """Forget ``buffer`` while views of it live; it is freed with its last view."""


@dataclass(eq=False)
class Allocation:
    """One buffer handed out by a TieredAllocator, with what it was charged.

    ``nbytes`` is what was asked for; ``nbytes_per_node`` what the budgets were charged (the
    buffer's page-rounded size split the way its chunks are placed). Use :meth:`tensor` for views
    and ``TieredAllocator.release`` (or closing the allocator) to give it back.
    """

    tensor_class: TensorClass
    nbytes: int
    placement: Placement
    nbytes_per_node: dict[int, int]
    tiers: tuple[TierName, ...]
    buffer: HostBufferLike = field(repr=False)
    released: bool = False

    @property
    def charged_nbytes(self) -> int:
        return sum(self.nbytes_per_node.values())

    def tensor(
        self, dtype: torch.dtype, shape: tuple[int, ...], offset_bytes: int = 0
    ) -> torch.Tensor:
        """A tensor view of the buffer from ``offset_bytes``; valid only until this is released."""
        if self.released:
            raise ValueError(
                f"this {self.tensor_class} allocation was released; allocate a new one"
            )
        return self.buffer.tensor(dtype, shape, offset_bytes)


@dataclass(frozen=True)
class UsageRow:
    """Budget and use of one tier (``node`` is None) or of one node of it, in bytes."""

    tier: TierName
    node: int | None
    budget_nbytes: int
    used_nbytes: int
    peak_nbytes: int
    n_allocations: int
    used_nbytes_by_class: dict[TensorClass, int]


class TieredAllocator:
    """Allocate host buffers by tensor class, within per-tier budgets, on the planned nodes.

    Args:
        topology: the machine (discovered or declared); tiers are seen from GPU ``gpu_index``.
        budgets: bytes per tier, e.g. ``{"dram": "64GiB", "cxl": "256GiB"}`` (see
            allocators.policies.parse_budgets; ``"cxl"`` may be a per-node dict).
        placements: a placement per tensor class, e.g. ``cxl_aware(...).by_class()``; a class
            without one goes to the local DRAM node.
        backing: gives and takes buffers (a :class:`Backing`); defaults to a HostPool of
            our own, which :meth:`close` also empties.
        pin: ask the backing for buffers page-locked for GPU DMA.

    Raises BudgetExceededError before any memory is touched when a request would pass a node's
    budget or the free memory the node had when the topology was read.

    >>> import torch
    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 30, free_bytes=1 << 30)
    >>> topo = Topology(nodes=(node,), distances={}, gpus=(), source="example")
    >>> with TieredAllocator(topo, budgets={"dram": "64MiB"}, pin=False) as alloc:
    ...     grads = alloc.allocate("grads", 1 << 20)
    ...     grads.tensor(torch.bfloat16, (512, 1024)).shape
    torch.Size([512, 1024])
    """

    def __init__(
        self,
        topology: Topology,
        budgets: BudgetSpec | Budgets = DEFAULT_BUDGETS,
        placements: Mapping[str, Placement | int | list[tuple[int, float]]] | None = None,
        backing: Backing | None = None,
        *,
        pin: bool = True,
        gpu_index: int = 0,
    ):
        self.topology = topology
        self.tiers = topology.tiers_for(gpu_index)
        self.budgets = parse_budgets(budgets, self.tiers)
        self.placements = {
            check_tensor_class(cls): self._checked_placement(spec)
            for cls, spec in (placements or {}).items()
        }
        if not self.tiers.local_dram:
            raise ValueError(f"{topology.source} has no DRAM node to use as local memory")
        self.local_node = self.tiers.local_dram[0].id
        self.pin = pin
        # The pool may keep released buffers up to the whole budget, so a step's activations
        # (often more than any fixed cache) are reused, not unpinned and re-pinned every step;
        # allocate() passes each node's remaining budget so in-use plus cached stays within it.
        self._own_pool = (
            HostPool(max_cached_nbytes=max(sum(self.budgets.node_nbytes.values()), 1))
            if backing is None
            else None
        )
        self.backing: Backing = self._own_pool if backing is None else backing
        self._lock = threading.Lock()
        self._closed = False
        self._live: set[Allocation] = set()
        nodes = list(self.budgets.node_nbytes)
        self._used = dict.fromkeys(nodes, 0)
        self._peak = dict.fromkeys(nodes, 0)
        self._tier_peak = dict.fromkeys(self.budgets.declared, 0)
        self._by_class = {node: dict.fromkeys(TENSOR_CLASSES, 0) for node in nodes}

    def _checked_placement(self, spec: Placement | int | list[tuple[int, float]]) -> Placement:
        placement = as_placement(spec)
        for node in placement.nodes:
            self.topology.node(node)
        return placement

    def allocate(
        self,
        tensor_class: str,
        nbytes: int,
        placement: Placement | int | list[tuple[int, float]] | None = None,
    ) -> Allocation:
        """A buffer of at least ``nbytes`` for ``tensor_class``, on the class's planned nodes.

        ``placement`` overrides the plan for this one buffer. The request is rounded up as the
        backing will map it (its ``size_for``: the pool's size class) and charged per node as its
        chunks will be placed; it is refused (nothing touched) when any node would pass its
        budget or its free memory.
        """
        cls = check_tensor_class(tensor_class)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes = {nbytes!r} must be a positive int (bytes to allocate)")
        if placement is not None:
            chosen = self._checked_placement(placement)
        else:
            chosen = self.placements.get(cls, as_placement(self.local_node))
        reserved = self._charge(cls, nbytes, chosen, self.backing.size_for(nbytes))
        try:
            with self._lock:
                room = {
                    node: budget - self._used[node]
                    for node, budget in self.budgets.node_nbytes.items()
                }
            buffer = self.backing.acquire(nbytes, chosen, pin=self.pin, room_nbytes=room)
        except BaseException:
            self._uncharge(cls, reserved)
            raise
        charge = reserved
        if buffer.nbytes != sum(reserved.values()):
            # The backing rounded differently than expected: charge what it really mapped.
            try:
                charge = self._charge(cls, nbytes, chosen, buffer.nbytes, replacing=reserved)
            except BaseException:
                self.backing.release(buffer)
                raise
        allocation = Allocation(
            tensor_class=cls,
            nbytes=nbytes,
            placement=chosen,
            nbytes_per_node=charge,
            tiers=tuple(t for t in TIER_NAMES if any(self._tier(n) == t for n in charge)),
            buffer=buffer,
        )
        with self._lock:
            closed_meanwhile = self._closed
            if not closed_meanwhile:
                self._live.add(allocation)
        if closed_meanwhile:
            self._uncharge(cls, charge)
            self.backing.release(buffer)
            raise ValueError("this TieredAllocator was closed while allocating; make a new one")
        return allocation

    def _tier(self, node: int) -> TierName | None:
        return self.budgets.node_tier.get(node)

    def _charge(
        self,
        cls: TensorClass,
        nbytes: int,
        placement: Placement,
        charged_nbytes: int,
        replacing: Mapping[int, int] | None = None,
    ) -> dict[int, int]:
        """Charge ``charged_nbytes`` split as the buffer's chunks will be, or refuse.

        ``replacing`` is an earlier charge for the same request, given back in the same locked
        step, so no other thread can take the budget in between.
        """
        split = split_nbytes(charged_nbytes, placement, self.backing.chunk_nbytes)
        per_node = {node: n for node, n in split.items() if n > 0}
        with self._lock:
            if replacing is not None:
                self._apply(cls, replacing, -1)
            if self._closed:
                raise ValueError("this TieredAllocator is closed; make a new one")
            for node, n in per_node.items():
                self._refuse_if_over(cls, nbytes, placement, node, n)
            self._apply(cls, per_node, +1)
            for node in per_node:
                self._peak[node] = max(self._peak[node], self._used[node])
            for tier in self._tier_peak:
                self._tier_peak[tier] = max(self._tier_peak[tier], self._tier_used(tier))
        return per_node

    def _apply(self, cls: TensorClass, per_node: Mapping[int, int], sign: int) -> None:
        for node, n in per_node.items():
            self._used[node] += sign * n
            self._by_class[node][cls] += sign * n

    def _uncharge(self, cls: TensorClass, per_node: Mapping[int, int]) -> None:
        with self._lock:
            self._apply(cls, per_node, -1)

    def _tier_used(self, tier: TierName) -> int:
        return sum(used for node, used in self._used.items() if self._tier(node) == tier)

    def _refuse_if_over(
        self, cls: TensorClass, nbytes: int, placement: Placement, node: int, n: int
    ) -> None:
        request = f"{cls} request of {format_bytes(nbytes)} ({nbytes} bytes) on {placement}"
        tier = self._tier(node)
        if tier is None:
            kind = "remote_dram" if self.topology.node(node).kind == "dram" else "cxl"
            raise BudgetExceededError(
                f"cannot place the {request}: node {node} has no budget; add "
                f"'{kind}': '<size>' to the budgets or place {cls} on budgeted nodes "
                f"{sorted(self.budgets.node_nbytes)}; nothing was allocated"
            )
        used = self._used[node]
        budget = self.budgets.node_nbytes[node]
        if used + n > budget:
            raise BudgetExceededError(
                f"cannot place the {request}: tier {tier!r} has a budget of "
                f"{format_bytes(self.budgets.tier_nbytes(tier))} with "
                f"{format_bytes(self._tier_used(tier))} already used; node {node} would need "
                f"{format_bytes(n)} more on top of {format_bytes(used)} already used of its "
                f"{format_bytes(budget)} budget. Release allocations, raise budget {tier!r}, or "
                f"place {cls} elsewhere; nothing was allocated"
            )
        free = self.topology.node(node).free_bytes
        if used + n > free:
            raise BudgetExceededError(
                f"cannot place the {request}: node {node} had only {format_bytes(free)} free "
                f"when the topology was read ({self.topology.source}) and this allocator "
                f"already holds {format_bytes(used)} there; {format_bytes(n)} more would push "
                f"the machine towards the OOM killer. Lower budget {tier!r} or free memory; "
                "nothing was allocated"
            )

    def release(self, allocation: Allocation) -> None:
        """Return an allocation's memory to the backing and its bytes to the budgets (idempotent).

        The backing refuses (BufferError) while tensor views of the buffer are alive; the
        allocation then stays live and charged, so nothing in use is handed out again.
        """
        with self._lock:
            if allocation.released:
                return
            if allocation not in self._live:
                raise ValueError("this allocation was not made by this TieredAllocator")
            self._live.discard(allocation)
            allocation.released = True
        try:
            self.backing.release(allocation.buffer)
        except BaseException:
            with self._lock:
                allocation.released = False
                self._live.add(allocation)
            raise
        self._uncharge(allocation.tensor_class, allocation.nbytes_per_node)

    @property
    def live_allocations(self) -> tuple[Allocation, ...]:
        with self._lock:
            return tuple(self._live)

    def usage(self) -> tuple[UsageRow, ...]:
        """Budget, use, peak and live allocations per tier, each followed by its nodes.

        Tiers with no node on this machine (a CXL budget on a machine without CXL) are left out.
        """
        with self._lock:
            rows = []
            for tier in TIER_NAMES:
                nodes = [n for n in self._used if self._tier(n) == tier]
                if not nodes:
                    continue
                holders = [
                    a for a in self._live if any(self._tier(n) == tier for n in a.nbytes_per_node)
                ]
                rows.append(
                    UsageRow(
                        tier=tier,
                        node=None,
                        budget_nbytes=self.budgets.tier_nbytes(tier),
                        used_nbytes=self._tier_used(tier),
                        peak_nbytes=self._tier_peak[tier],
                        n_allocations=len(holders),
                        used_nbytes_by_class={
                            c: sum(self._by_class[n][c] for n in nodes) for c in TENSOR_CLASSES
                        },
                    )
                )
                rows.extend(
                    UsageRow(
                        tier=tier,
                        node=node,
                        budget_nbytes=self.budgets.node_nbytes[node],
                        used_nbytes=self._used[node],
                        peak_nbytes=self._peak[node],
                        n_allocations=sum(1 for a in self._live if node in a.nbytes_per_node),
                        used_nbytes_by_class=dict(self._by_class[node]),
                    )
                    for node in nodes
                )
            return tuple(rows)

    def usage_frame(self) -> pd.DataFrame:
        """:meth:`usage` as a table: one row per tier (node "all") and per node, a column per class."""
        import pandas as pd  # deferred: `import allocators` stays light

        records: list[dict[str, Any]] = []
        for row in self.usage():
            record: dict[str, Any] = {
                "tier": row.tier,
                "node": "all" if row.node is None else row.node,
                "budget_nbytes": row.budget_nbytes,
                "used_nbytes": row.used_nbytes,
                "peak_nbytes": row.peak_nbytes,
                "n_allocations": row.n_allocations,
            }
            record.update(row.used_nbytes_by_class)
            records.append(record)
        return pd.DataFrame.from_records(records)

    def close(self, *, abandon_busy: bool = False) -> None:
        """Release every live allocation (and empty our own pool); later allocations are refused.

        Allocations whose tensor views are still alive stay live; one BufferError lists them
        after the rest are released, and calling close() again once they are gone finishes.
        With ``abandon_busy`` (an exception on its way out holds views in its frames) they are
        uncharged and handed to the backing's ``abandon`` instead: the memory goes back when
        their last view does, and close() raises nothing.

        >>> import torch
        >>> from allocators.sysfs_topology import discover
        >>> allocator = TieredAllocator(discover(), budgets={"dram": "1MiB"}, pin=False)
        >>> view = allocator.allocate("activations", 4096).tensor(torch.uint8, (4096,))
        >>> allocator.close(abandon_busy=True); allocator.live_allocations
        ()
        """
        with self._lock:
            self._closed = True
            live = list(self._live)
        busy = []
        for allocation in live:
            try:
                self.release(allocation)
            except BufferError:
                busy.append(allocation)
        if busy and abandon_busy:
            for allocation in busy:
                with self._lock:
                    self._live.discard(allocation)
                    allocation.released = True
                self.backing.abandon(allocation.buffer)
                self._uncharge(allocation.tensor_class, allocation.nbytes_per_node)
            busy = []
        if self._own_pool is not None:
            self._own_pool.clear()
        if busy:
            names = ", ".join(f"{a.tensor_class} ({format_bytes(a.nbytes)})" for a in busy)
            raise BufferError(
                f"close() left {len(busy)} allocation(s) with live tensor views: {names}; "
                "delete those tensors and call close() again"
            )

    def __enter__(self) -> TieredAllocator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
