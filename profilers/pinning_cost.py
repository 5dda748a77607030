"""Seconds per GiB to make host memory usable for DMA, per node and page size: allocate and
pre-fault, register with CUDA, and torch's pin_memory as reference. Measures only.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from allocators import cuda_host
from allocators.errors import OffloadError
from allocators.host_buffer import HostBuffer
from allocators.placement import as_placement
from profilers.placed_memory import PAGE_SIZES, check_page_size
from profilers.result_row import ResultRow, placement_label
from profilers.trial_stats import MIN_TRIALS, repeat

GIB = 1 << 30


@dataclass(frozen=True)
class PinningConfig:
    """Nodes, page sizes, buffer size per trial, and whether CUDA registration can be timed.

    >>> PinningConfig(nodes=(0,), nbytes=1 << 20, cuda=False).page_sizes
    ('4KiB', '2MiB')
    """

    nodes: tuple[int, ...]
    nbytes: int
    cuda: bool
    page_sizes: tuple[str, ...] = PAGE_SIZES
    trials: int = MIN_TRIALS
    warmup: int = 1


def expected_rows(config: PinningConfig) -> int:
    """Rows :func:`measure_pinning` yields: 1 per node and page size, 3 with CUDA, plus 1 reference.

    >>> expected_rows(PinningConfig(nodes=(0, 1), nbytes=1, cuda=True))
    13
    """
    per_case = 3 if config.cuda else 1
    return len(config.nodes) * len(config.page_sizes) * per_case + (1 if config.cuda else 0)


def _make_seconds_per_gib(nbytes: int, node: int, pin: bool, huge: bool) -> float:
    start = time.perf_counter()
    HostBuffer(nbytes, placement=node, pin=pin, huge_pages=huge).free()
    return (time.perf_counter() - start) / (nbytes / GIB)


def _register_seconds_per_gib(buffer: HostBuffer) -> float:
    start = time.perf_counter()
    registration = cuda_host.register(buffer.ptr, buffer.nbytes)
    seconds = time.perf_counter() - start
    cuda_host.unregister(registration)
    if not registration.pinned:
        raise OffloadError(
            f"cudaHostRegister failed: {registration.reason}; raise `ulimit -l` and rerun"
        )
    return seconds / (buffer.nbytes / GIB)


def _pin_memory_seconds_per_gib(nbytes: int) -> float:
    import torch

    start = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return (time.perf_counter() - start) / (nbytes / GIB)


def measure_pinning(config: PinningConfig) -> Iterator[ResultRow]:
    """Yield ``pinning`` rows in s/GiB: ``allocate+prefault`` (mmap, mbind, MADV_HUGEPAGE,
    touch, placement check) always; ``register`` and ``allocate+prefault+register`` with CUDA;
    and ``torch pin_memory`` once (NUMA-blind, rounds sizes up) as reference.

    >>> config = PinningConfig(nodes=(0,), nbytes=1 << 20, cuda=False, page_sizes=("4KiB",))
    >>> [r.case for r in measure_pinning(config)]
    ['allocate+prefault']
    """
    nbytes = config.nbytes

    def timed(action: Callable[[], float]):
        return repeat(action, trials=config.trials, warmup=config.warmup)

    for node in config.nodes:
        label = placement_label(as_placement(node))
        for page_size in config.page_sizes:
            huge = check_page_size(page_size)
            common = {"page_size": page_size, "kernel": "HostBuffer"}
            make = functools.partial(_make_seconds_per_gib, nbytes, node, huge=huge)
            stats = timed(functools.partial(make, pin=False))
            yield ResultRow.from_stats(
                "pinning",
                "allocate+prefault",
                label,
                nbytes,
                "s/GiB",
                stats,
                memory="pageable",
                **common,
            )
            if not config.cuda:
                continue
            with HostBuffer(nbytes, placement=node, pin=False, huge_pages=huge) as buffer:
                stats = timed(functools.partial(_register_seconds_per_gib, buffer))
            yield ResultRow.from_stats(
                "pinning", "register", label, nbytes, "s/GiB", stats, memory="pinned",
                page_size=page_size, kernel="cudaHostRegister",
            )  # fmt: skip
            stats = timed(functools.partial(make, pin=True))
            yield ResultRow.from_stats(
                "pinning", "allocate+prefault+register", label, nbytes, "s/GiB", stats,
                memory="pinned", **common,
            )  # fmt: skip
    if config.cuda:
        stats = timed(functools.partial(_pin_memory_seconds_per_gib, nbytes))
        yield ResultRow.from_stats(
            "pinning", "torch pin_memory", "any (NUMA-blind)", nbytes, "s/GiB", stats,
            memory="pin_memory", kernel="torch",
        )  # fmt: skip
