"""Measurement buffers placed on NUMA nodes through allocators.host_buffer, with their address.

Only the hand-off between the allocator and the kernels lives here; placement logic is the
allocator's and must not be repeated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from allocators.placement import Placement, as_placement
from profilers.result_row import placement_label
from profilers.thp_usage import thp_backed_nbytes

PAGE_SIZES = ("4KiB", "2MiB")


@dataclass
class PlacedMemory:
    """A placed host buffer as a flat uint8 tensor, its address, and how it was asked for.

    ``page_size`` is what was requested (``"4KiB"`` or ``"2MiB"`` via THP); the kernel may back
    less with huge pages, which :meth:`thp_fraction` reports.
    """

    tensor: torch.Tensor
    placement: Placement
    page_size: str
    pinned: bool

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def label(self) -> str:
        return placement_label(self.placement)

    def thp_fraction(self) -> float | None:
        """Share of the buffer backed by huge pages; None when smaps cannot say."""
        backed = thp_backed_nbytes(self.address, self.nbytes)
        return None if backed is None else min(1.0, backed / max(1, self.nbytes))


def check_page_size(page_size: str) -> bool:
    """Return True for 2 MiB pages, False for 4 KiB; raise for anything else.

    >>> check_page_size("2MiB")
    True
    """
    if page_size not in PAGE_SIZES:
        raise ValueError(f"page size {page_size!r} is not offered; write one of {list(PAGE_SIZES)}")
    return page_size == "2MiB"


@contextmanager
def placed_memory(
    nbytes: int,
    placement: Placement | int | list[tuple[int, float]],
    *,
    page_size: str = "4KiB",
    pin: bool = False,
) -> Iterator[PlacedMemory]:
    """Allocate ``nbytes`` placed per ``placement`` (pre-faulted, pinned if asked), free on exit.

    >>> with placed_memory(1 << 20, 0) as mem:  # doctest: +SKIP
    ...     mem.nbytes
    1048576
    """
    from allocators.host_buffer import HostBuffer  # imported late: it may touch CUDA if pin=True

    huge = check_page_size(page_size)
    where = as_placement(placement)
    buffer: Any = HostBuffer(nbytes, placement=where, pin=pin, huge_pages=huge)
    try:
        tensor = buffer.tensor(torch.uint8, (nbytes,))
        yield PlacedMemory(
            tensor=tensor, placement=where, page_size=page_size, pinned=bool(buffer.pinned)
        )
    finally:
        del tensor
        buffer.free()
