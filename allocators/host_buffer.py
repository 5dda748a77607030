"""A placed host buffer: mmap, one mbind per stripe extent, THP, threaded pre-fault, then pinning.

It owns one mapping and hands out tensor views of it; pooling and budgets live elsewhere.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import threading
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from allocators import cuda_host, numa
from allocators.errors import BudgetExceededError, NumaError
from allocators.placement import Placement, as_placement
from allocators.striping import DEFAULT_CHUNK_NBYTES, Extent, stripe
from allocators.units import format_bytes, parse_size

if TYPE_CHECKING:
    import torch

PAGE_NBYTES = os.sysconf("SC_PAGE_SIZE")
_HUGE_PAGE_NBYTES = 2 << 20
_PROT_READ_WRITE = 0x1 | 0x2
_MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
_MAP_FAILED = ctypes.c_void_p(-1).value


class PlacementDriftWarning(UserWarning):
    """Pages of a buffer are not on the nodes its placement planned."""


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = numa.libc()
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    lib.memset.restype = ctypes.c_void_p
    return lib


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _map_anonymous(nbytes: int, align: int) -> int:
    """mmap ``nbytes`` of anonymous memory starting on an ``align`` boundary (exact size kept).

    Over-map by ``align`` and unmap the unaligned head and tail: a huge page can only back a
    2 MiB-aligned range, and older kernels do not align large anonymous maps themselves.
    """
    lib = _libc()
    span = nbytes + (align if align > PAGE_NBYTES else 0)
    raw = lib.mmap(None, span, _PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS, -1, 0)
    if raw in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise MemoryError(
            f"mmap of {format_bytes(span)} failed ({os.strerror(err)}); "
            "free host memory or ask for a smaller buffer"
        )
    start = _round_up(raw, align) if span > nbytes else raw
    if start > raw:
        lib.munmap(raw, start - raw)
    if raw + span > start + nbytes:
        lib.munmap(start + nbytes, raw + span - start - nbytes)
    return start


def _populate(addr: int, nbytes: int) -> None:
    """Fault in ``[addr, addr + nbytes)`` for writing, from the calling thread.

    MADV_POPULATE_WRITE (Linux 5.14+) faults without writing a byte and reports ENOMEM
    instead of killing the process; older kernels get a memset.
    """
    lib = _libc()
    if lib.madvise(addr, nbytes, _MADV_POPULATE_WRITE) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL:
        lib.memset(addr, 0, nbytes)
        return
    raise MemoryError(
        f"pre-faulting {format_bytes(nbytes)} at {addr:#x} failed ({os.strerror(err)}): "
        "the planned nodes have no room; shrink the buffer or place it elsewhere"
    )


class _Mapping:
    """What the finalizer needs to undo: it must not reference the HostBuffer itself."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.addr = addr
        self.nbytes = nbytes
        self.registration = cuda_host.Registration(pinned=False)


def _release(mapping: _Mapping) -> None:
    """Unpin and unmap; run once, by free(), by garbage collection or at interpreter exit."""
    errors = cuda_host.unregister(mapping.registration)
    mapping.registration = cuda_host.Registration(pinned=False)
    _libc().munmap(mapping.addr, mapping.nbytes)
    if errors:
        warnings.warn("; ".join(errors), RuntimeWarning, stacklevel=2)


class _Region:
    """A numpy-visible window on the mapping that keeps its HostBuffer alive.

    Every tensor derived from a view holds this object (numpy's ``base``), so the mapping cannot
    be unmapped by garbage collection under a live tensor, and free() can count live views.
    """

    def __init__(self, owner: HostBuffer, addr: int, nbytes: int) -> None:
        self.owner = owner
        self.__array_interface__ = {
            "data": (addr, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


def machine_memory_nbytes() -> int:
    """Physical memory of this machine over all nodes (what every tier together can hold).

    >>> machine_memory_nbytes() > 0
    True
    """
    return PAGE_NBYTES * os.sysconf("SC_PHYS_PAGES")


def check_fits_machine(nbytes: int, what: str = "HostBuffer") -> None:
    """Refuse ``nbytes`` beyond this machine's memory, before anything is mapped or striped.

    >>> check_fits_machine(1 << 20)
    """
    total = machine_memory_nbytes()
    if nbytes > total:
        raise BudgetExceededError(
            f"{what} of {format_bytes(nbytes)} ({nbytes} bytes) is more than this machine's "
            f"memory ({format_bytes(total)} over all NUMA nodes); ask for a smaller buffer"
        )


class HostBuffer:
    """Host memory of ``nbytes`` striped over NUMA nodes by ``placement``, pinned when it can be.

    Args:
        nbytes: bytes to allocate (int or a size string such as ``"1GiB"``); the mapping is
            rounded up to whole pages only (no power-of-two rounding).
        placement: a node id, ``[(node, fraction), ...]`` or a Placement.
        pin: page-lock with cudaHostRegister when CUDA is available.
        huge_pages: ask for transparent huge pages (MADV_HUGEPAGE); ignored where unsupported.
        chunk_nbytes: striping granularity; each chunk sits wholly on one node.
        prefault_threads: threads touching the pages (default: usable CPUs, at most 8).
        strict: MPOL_BIND instead of the default MPOL_PREFERRED. PREFERRED is the default
            because a BIND-ed node that runs out of memory invokes the OOM killer from inside
            the pre-fault, with no exception to catch; PREFERRED spills to other nodes instead,
            and the placement check after pre-faulting reports the pages that spilled
            (``misplaced_pages`` and a PlacementDriftWarning).
        register_chunk_nbytes: piece size for cudaHostRegister (None: the whole buffer in one
            call, the default).

    Raises:
        PlacementError: a node does not exist (the message lists the online nodes).
        BudgetExceededError: ``nbytes`` is more than this machine's memory (refused at once,
            before any mapping: such a size is a mistake, and striping it would take hours).
        MemoryError: the memory could not be mapped or faulted in.

    State: ``placement_enforced`` is False when the OS refused mbind (EPERM in containers
    without CAP_SYS_NICE, ENOSYS) and ``fallback_reason`` says why; ``pinned`` is False
    without CUDA or when the driver refused, with ``pin_reason``.

    >>> import torch
    >>> with HostBuffer(1 << 20, placement=0, pin=False) as buf:
    ...     view = buf.tensor(torch.float32, (256, 1024))
    ...     _ = view.fill_(1.5)
    ...     total = float(view.sum())
    ...     del view, _
    >>> total
    393216.0
    """

    def __init__(
        self,
        nbytes: int | str,
        placement: Placement | int | Sequence[tuple[int, float]],
        *,
        pin: bool = True,
        huge_pages: bool = True,
        chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
        prefault_threads: int | None = None,
        strict: bool = False,
        register_chunk_nbytes: int | None = cuda_host.DEFAULT_REGISTER_CHUNK_NBYTES,
    ) -> None:
        self.requested_nbytes = parse_size(nbytes, what="HostBuffer nbytes")
        if self.requested_nbytes <= 0:
            raise ValueError(f"HostBuffer nbytes = {nbytes!r} must be > 0 bytes")
        check_fits_machine(self.requested_nbytes)
        if chunk_nbytes <= 0 or chunk_nbytes % PAGE_NBYTES:
            raise ValueError(
                f"chunk_nbytes = {chunk_nbytes} must be a positive multiple of the page size "
                f"{PAGE_NBYTES}; the default {DEFAULT_CHUNK_NBYTES} keeps huge pages whole"
            )
        threads = prefault_threads or min(8, len(os.sched_getaffinity(0)))
        if threads < 1:
            raise ValueError(f"prefault_threads = {prefault_threads} must be >= 1 (or None)")
        self.placement = as_placement(placement)
        numa.check_nodes(self.placement.nodes)
        self.nbytes = _round_up(self.requested_nbytes, PAGE_NBYTES)
        self.extents: list[Extent] = stripe(self.nbytes, self.placement, chunk_nbytes)
        self.strict = strict
        self.placement_enforced = True
        self.fallback_reason: str | None = None
        self.huge_pages = False
        self.pinned = False
        self.pin_reason: str | None = None if pin else "pin=False"
        self.misplaced_pages: int | None = None
        self._regions: weakref.WeakSet[_Region] = weakref.WeakSet()
        self._lock = threading.Lock()

        align = _HUGE_PAGE_NBYTES if huge_pages and self.nbytes >= _HUGE_PAGE_NBYTES else 1
        self._mapping = _Mapping(_map_anonymous(self.nbytes, align), self.nbytes)
        self._finalizer = weakref.finalize(self, _release, self._mapping)
        try:
            self._place()
            if huge_pages:
                self.huge_pages = _libc().madvise(self.ptr, self.nbytes, _MADV_HUGEPAGE) == 0
            self._prefault(threads)
            self._check_placement("after pre-faulting (a node may be full)")
            if pin:
                self._pin(register_chunk_nbytes)
        except BaseException:
            self._finalizer()
            raise

    @property
    def ptr(self) -> int:
        """Address of the first byte."""
        return self._mapping.addr

    @property
    def freed(self) -> bool:
        return not self._finalizer.alive

    @property
    def live_views(self) -> int:
        """How many tensor views (and tensors derived from them) are still alive."""
        return len(self._regions)

    def _place(self) -> None:
        mode = numa.Mode.MPOL_BIND if self.strict else numa.Mode.MPOL_PREFERRED
        for extent in self.extents:
            outcome = numa.mbind(self.ptr + extent.offset, extent.length, mode, [extent.node])
            if not outcome.enforced:
                self.placement_enforced = False
                self.fallback_reason = outcome.reason
                return

    def _prefault(self, threads: int) -> None:
        # Slices end on huge-page boundaries so two threads never fault the same huge page.
        step = _round_up(-(-self.nbytes // threads), _HUGE_PAGE_NBYTES)
        slices = [
            (self.ptr + off, min(step, self.nbytes - off)) for off in range(0, self.nbytes, step)
        ]
        if len(slices) == 1:
            _populate(*slices[0])
            return
        # ctypes drops the GIL during each call, so the threads fault pages in parallel.
        with ThreadPoolExecutor(max_workers=len(slices)) as pool:
            list(pool.map(lambda piece: _populate(*piece), slices))

    def _expected_nodes(self) -> np.ndarray:
        expected = np.empty(self.nbytes // PAGE_NBYTES, dtype=np.int32)
        for extent in self.extents:
            first = extent.offset // PAGE_NBYTES
            expected[first : first + extent.length // PAGE_NBYTES] = extent.node
        return expected

    def _check_placement(self, when: str) -> None:
        """Count pages off their planned node; warn when the count grew."""
        if not self.placement_enforced:
            return
        try:
            actual = numa.page_nodes(self.ptr, self.nbytes, PAGE_NBYTES)
        except NumaError as exc:
            self.misplaced_pages = None
            warnings.warn(
                f"cannot check page placement: {exc}", PlacementDriftWarning, stacklevel=3
            )
            return
        misplaced = int(np.count_nonzero(actual != self._expected_nodes()))
        if misplaced > (self.misplaced_pages or 0):
            warnings.warn(
                f"{misplaced} of {len(actual)} pages of {self!r} are not on their planned "
                f"node {when}; now per node: {self.pages_per_node()}",
                PlacementDriftWarning,
                stacklevel=3,
            )
        self.misplaced_pages = misplaced

    def _pin(self, register_chunk_nbytes: int | None) -> None:
        registration = cuda_host.register(self.ptr, self.nbytes, register_chunk_nbytes)
        self._mapping.registration = registration
        self.pinned = registration.pinned
        self.pin_reason = registration.reason
        if self.pinned:
            self._check_placement("after pinning (pinning migrates pages off movable memory)")

    def pages_per_node(self) -> dict[int, int]:
        """Pages per NUMA node, from move_pages over every page (no sampling: one syscall
        per million pages, about 30 ms per GiB). Key -1 counts pages not in memory.

        >>> HostBuffer(8192, placement=0, pin=False).pages_per_node()
        {0: 2}
        """
        self._require_alive()
        nodes = numa.page_nodes(self.ptr, self.nbytes, PAGE_NBYTES)
        values, numbers = np.unique(np.where(nodes >= 0, nodes, -1), return_counts=True)
        counts = {int(v): int(c) for v, c in zip(values, numbers, strict=True)}
        return dict(sorted(counts.items()))

    def tensor(
        self, dtype: torch.dtype, shape: int | Sequence[int], offset_bytes: int = 0
    ) -> torch.Tensor:
        """A tensor of ``dtype`` and ``shape`` over this buffer's memory from ``offset_bytes``.

        The view shares the memory (writes land in the buffer) and keeps the buffer alive;
        free() refuses to run while it (or anything derived from it) is alive.

        >>> import torch
        >>> buf = HostBuffer(4096, placement=0, pin=False)
        >>> buf.tensor(torch.int32, (2, 4), offset_bytes=16).shape
        torch.Size([2, 4])
        """
        import torch  # deferred: importing torch costs about a second

        self._require_alive()
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(not isinstance(d, int) or d < 0 for d in dims):
            raise ValueError(f"shape {shape!r} must be ints >= 0, e.g. (1024, 4096)")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = int(np.prod(dims, dtype=np.int64)) * itemsize
        if offset_bytes < 0 or offset_bytes % itemsize:
            raise ValueError(
                f"offset_bytes = {offset_bytes} must be >= 0 and a multiple of {itemsize} "
                f"(the size of {dtype})"
            )
        if offset_bytes + nbytes > self.nbytes:
            raise ValueError(
                f"a {dtype} tensor of shape {dims} at offset {offset_bytes} needs "
                f"{offset_bytes + nbytes} bytes, but the buffer holds {self.nbytes}; "
                "ask for a smaller view or a larger buffer"
            )
        region = _Region(self, self.ptr + offset_bytes, nbytes)
        with self._lock:
            self._regions.add(region)
        flat = torch.from_numpy(np.asarray(region))
        return flat.view(dtype).reshape(dims)

    def free(self, force: bool = False) -> None:
        """Unpin and unmap now; a second call does nothing.

        Refuses (BufferError) while tensor views are alive; ``force=True`` frees anyway, and
        any later use of those views crashes the process.

        >>> buf = HostBuffer(4096, placement=0, pin=False)
        >>> buf.free(); buf.free(); buf.freed
        True
        """
        with self._lock:
            live = len(self._regions)
            if live and not force and self._finalizer.alive:
                raise BufferError(
                    f"{live} tensor view(s) of {self!r} are still alive; delete them before "
                    "free(), or call free(force=True) if nothing will touch them again"
                )
            self._finalizer()

    def _require_alive(self) -> None:
        if self.freed:
            raise BufferError(f"{self!r} has been freed; allocate a new HostBuffer")

    def __enter__(self) -> HostBuffer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # With an exception in flight, live views are likely held by its traceback: leave the
        # memory to the finalizer (it runs once the last view is gone) rather than mask it.
        if exc_type is not None and self.live_views:
            return
        self.free()

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"pinned={self.pinned}"
        enforced = "" if self.placement_enforced else ", placement not enforced"
        return f"HostBuffer({format_bytes(self.nbytes)}, {self.placement}, {state}{enforced})"
