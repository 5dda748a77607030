"""The measurement kernels behind one interface: the compiled C library, or a numpy fallback
labelled degraded. Kernels take raw addresses; they must not allocate or place memory.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from allocators.errors import KernelBuildError, OffloadError
from profilers.kernel_build import build_kernels

LINE_BYTES = 64
StreamKind = Literal["read", "write", "copy", "triad", "update"]
# STREAM's four kinds, what a memory sweep runs unless told otherwise.
STREAM_KINDS: tuple[StreamKind, ...] = ("read", "write", "copy", "triad")
# Every kind the kernels run: "update" (a = a * s + b, in place) is an optimizer's access pattern.
KERNEL_KINDS: tuple[StreamKind, ...] = (*STREAM_KINDS, "update")
# Array bytes moved per array byte in one pass, counted as STREAM does: each array read or written
# counts once. Without non-temporal stores the hardware also reads a written line first (write-
# allocate), so write, copy and triad move 2, 3 and 4 arrays; update writes back lines it has
# just read, so its 3 is what the hardware moves.
STREAM_TRAFFIC = {"read": 1, "write": 1, "copy": 2, "triad": 3, "update": 3}
STREAM_ARRAYS = {"read": 1, "write": 1, "copy": 2, "triad": 3, "update": 2}


class Kernels(Protocol):
    """What the latency and memory profilers need from a kernel implementation."""

    name: str
    degraded: bool
    note: str

    def chase_build(self, address: int, nbytes: int, seed: int = 1) -> int:
        """Link the buffer's cache lines into one random cycle; return the line count."""
        ...

    def chase_ns_per_load(self, address: int, nloads: int) -> float:
        """Follow the cycle built at ``address`` for ``nloads`` dependent loads; ns per load."""
        ...

    def stream_seconds(
        self,
        kind: StreamKind,
        arrays: tuple[int, ...],
        nbytes: int,
        cpus: tuple[int, ...],
        passes: int,
    ) -> float:
        """Seconds for ``passes`` passes of ``kind`` over arrays of ``nbytes`` each."""
        ...


@dataclass
class CKernels:
    """The compiled kernels (profilers/csrc), loaded with ctypes; machine speed.

    >>> k = load_kernels()
    >>> k.name in ("c", "numpy")
    True
    """

    library: ctypes.CDLL
    name: str = "c"
    degraded: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        lib = self.library
        lib.chase_build.restype = ctypes.c_size_t
        lib.chase_build.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_uint64,
        ]
        lib.chase_ns_per_load.restype = ctypes.c_double
        lib.chase_ns_per_load.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint64,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        lib.stream_seconds.restype = ctypes.c_double
        lib.stream_seconds.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_double),
        ]

    def chase_build(self, address: int, nbytes: int, seed: int = 1) -> int:
        lines = int(self.library.chase_build(address, nbytes, LINE_BYTES, seed))
        if lines == 0:
            raise ValueError(f"chase buffer of {nbytes} bytes holds < 2 lines of {LINE_BYTES} B")
        return lines

    def chase_ns_per_load(self, address: int, nloads: int) -> float:
        sink = ctypes.c_void_p()
        return float(self.library.chase_ns_per_load(address, nloads, ctypes.byref(sink)))

    def stream_seconds(
        self,
        kind: StreamKind,
        arrays: tuple[int, ...],
        nbytes: int,
        cpus: tuple[int, ...],
        passes: int,
    ) -> float:
        _check_stream_args(kind, arrays, cpus)
        padded = (*arrays, 0, 0)[:3]
        cpu_array = (ctypes.c_int * len(cpus))(*cpus)
        checksum = ctypes.c_double()
        seconds = float(
            self.library.stream_seconds(
                KERNEL_KINDS.index(kind),
                *(a or None for a in padded),
                nbytes,
                cpu_array,
                len(cpus),
                passes,
                ctypes.byref(checksum),
            )
        )
        if seconds == -3:
            raise OffloadError(
                f"could not pin a thread to CPUs {list(cpus)}; list CPUs this process may use"
            )
        if seconds < 0:
            raise OffloadError(f"stream kernel failed (code {seconds:g}) for {len(cpus)} threads")
        return seconds


@dataclass
class NumpyKernels:
    """Pure numpy stand-ins, used only when no C compiler works; every row they produce is
    labelled degraded (the chase pays Python's interpreter per load, streams run on one thread).

    >>> k = NumpyKernels(note="test")
    >>> buf = np.zeros(4096 // 8, dtype=np.uint64)
    >>> k.chase_build(buf.ctypes.data, buf.nbytes)
    64
    >>> k.chase_ns_per_load(buf.ctypes.data, 64) > 0
    True
    """

    note: str
    name: str = "numpy"
    degraded: bool = True
    _lines: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def _words(address: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint64 * (nbytes // 8)).from_address(address))

    def chase_build(self, address: int, nbytes: int, seed: int = 1) -> int:
        lines = nbytes // LINE_BYTES
        if lines < 2:
            raise ValueError(f"chase buffer of {nbytes} bytes holds < 2 lines of {LINE_BYTES} B")
        order = np.random.default_rng(seed).permutation(lines).astype(np.uint64)
        words = self._words(address, lines * LINE_BYTES)
        # Visiting lines in a random order and linking each to the next gives one single cycle.
        words[order * (LINE_BYTES // 8)] = np.roll(order, -1)
        self._lines[address] = lines
        return lines

    def chase_ns_per_load(self, address: int, nloads: int) -> float:
        words = self._words(address, self._lines[address] * LINE_BYTES)
        stride = LINE_BYTES // 8
        index = 0
        start = time.perf_counter_ns()
        for _ in range(nloads):
            index = int(words[index * stride])
        return (time.perf_counter_ns() - start) / nloads

    def stream_seconds(
        self,
        kind: StreamKind,
        arrays: tuple[int, ...],
        nbytes: int,
        cpus: tuple[int, ...],
        passes: int,
    ) -> float:
        _check_stream_args(kind, arrays, cpus)
        views = [
            np.ctypeslib.as_array((ctypes.c_double * (nbytes // 8)).from_address(a)) for a in arrays
        ]
        start = time.perf_counter()
        for p in range(passes):
            scalar = 3.0 + p
            if kind == "read":
                views[0].sum()
            elif kind == "write":
                views[0].fill(scalar)
            elif kind == "copy":
                np.copyto(views[1], views[0])
            elif kind == "update":
                views[0] *= 1.0 / scalar
                views[0] += views[1]
            else:
                np.multiply(views[2], scalar, out=views[0])
                views[0] += views[1]
        return time.perf_counter() - start


def _check_stream_args(kind: str, arrays: tuple[int, ...], cpus: tuple[int, ...]) -> None:
    if kind not in KERNEL_KINDS:
        raise ValueError(f"stream kind {kind!r} is unknown; write one of {list(KERNEL_KINDS)}")
    if len(arrays) != STREAM_ARRAYS[kind]:
        raise ValueError(f"{kind} needs {STREAM_ARRAYS[kind]} arrays, got {len(arrays)}")
    if not cpus:
        raise ValueError("no CPUs given; list at least one CPU to run the stream threads on")


@functools.lru_cache(maxsize=4)
def load_kernels(cc: str | None = None) -> CKernels | NumpyKernels:
    """The C kernels, built on first use; the degraded numpy kernels when building fails.

    >>> load_kernels("/no/such/cc").degraded
    True
    """
    try:
        return CKernels(library=ctypes.CDLL(str(build_kernels(cc))))
    except (KernelBuildError, OSError) as exc:
        return NumpyKernels(note=f"degraded: numpy fallback ({exc})")
