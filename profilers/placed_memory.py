"""Measurement buffers placed on NUMA nodes through allocators.host_buffer, with their address.

Only the hand-off between the allocator and the kernels lives here; placement logic is the
allocator's and must not be repeated.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from allocators.errors import OffloadError
from allocators.host_buffer import HostBuffer
from allocators.placement import Placement
from profilers.result_row import placement_label
from profilers.thp_usage import thp_backed_nbytes

PAGE_SIZES = ("4KiB", "2MiB")


@dataclass
class PlacedMemory:
    """A placed, pre-faulted host buffer and how it was asked for.

    ``page_size`` is what was requested (``"4KiB"``, or ``"2MiB"`` through THP); the kernel may
    back less with huge pages, which :meth:`thp_fraction` reports.
    """

    buffer: HostBuffer
    page_size: str

    @property
    def address(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def label(self) -> str:
        return placement_label(self.buffer.placement)

    @property
    def note(self) -> str:
        """Why the buffer is not what was asked for (placement or pinning refused), or ``""``."""
        reasons = []
        if not self.buffer.placement_enforced:
            reasons.append(f"placement not enforced: {self.buffer.fallback_reason}")
        if self.buffer.misplaced_pages:
            reasons.append(f"{self.buffer.misplaced_pages} pages off their planned node")
        return "; ".join(reasons)

    def require_pinned(self) -> None:
        """Raise when pinning was asked for and refused: DMA timings would be of pageable memory."""
        if not self.buffer.pinned:
            raise OffloadError(
                f"host buffer on {self.label} could not be pinned ({self.buffer.pin_reason}); "
                "raise `ulimit -l` or free host memory, then rerun"
            )

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
    placement: Placement | int | Sequence[tuple[int, float]],
    *,
    page_size: str = "4KiB",
    pin: bool = False,
) -> Iterator[PlacedMemory]:
    """Allocate ``nbytes`` placed per ``placement`` (pre-faulted, pinned if asked); free on exit.

    Tensor views taken from ``.buffer`` must be dropped before the block ends.

    >>> with placed_memory(1 << 20, 0) as mem:
    ...     (mem.nbytes, mem.label)
    (1048576, 'node0')
    """
    huge = check_page_size(page_size)
    with HostBuffer(nbytes, placement=placement, pin=pin, huge_pages=huge) as buffer:
        yield PlacedMemory(buffer=buffer, page_size=page_size)
