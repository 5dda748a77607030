"""CPU memory bandwidth per NUMA node and thread count: read, write, copy, triad and in-place update
passes over placed buffers, threads pinned to one node's cores. Measures only; no printing, no files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from allocators.units import parse_size
from profilers.kernels import (
    STREAM_ARRAYS,
    STREAM_KINDS,
    STREAM_TRAFFIC,
    Kernels,
    StreamKind,
    load_kernels,
)
from profilers.placed_memory import placed_memory
from profilers.result_row import ResultRow
from profilers.trial_stats import MIN_TRIALS, TrialStats, repeat

MIB, GIB = 1 << 20, 1 << 30


def last_level_cache_nbytes(sysfs_root: Path = Path("/sys")) -> int:
    """Size of CPU 0's largest cache from sysfs (0 when not reported).

    >>> last_level_cache_nbytes() >= 0
    True
    """
    sizes = [0]
    for index in (sysfs_root / "devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            sizes.append(parse_size((index / "size").read_text().strip(), what=str(index)))
        except (OSError, ValueError):
            continue
    return max(sizes)


def default_array_nbytes(quick: bool = False) -> int:
    """Bytes per array: 4x the LLC (so caches cannot serve it), clamped to 256 MiB..1 GiB;
    256 MiB with ``quick``.

    >>> default_array_nbytes(quick=True)
    268435456
    """
    if quick:
        return 256 * MIB
    return min(GIB, max(256 * MIB, 4 * last_level_cache_nbytes()))


def thread_counts(ncpus: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``ncpus``, always ending with ``ncpus``.

    >>> thread_counts(6)
    (1, 2, 4, 6)
    """
    counts = [1 << i for i in range(ncpus.bit_length()) if 1 << i <= ncpus]
    if counts[-1] != ncpus:
        counts.append(ncpus)
    return tuple(counts)


@dataclass(frozen=True)
class MemoryConfig:
    """Nodes whose memory is measured, the CPUs the threads run on, and the sweep.

    >>> MemoryConfig(nodes=(0,), cpus=(0, 1), nbytes=1 << 20).threads
    (1, 2)
    """

    nodes: tuple[int, ...]
    cpus: tuple[int, ...]
    nbytes: int
    threads: tuple[int, ...] = ()
    kinds: tuple[StreamKind, ...] = STREAM_KINDS
    passes: int = 1
    trials: int = MIN_TRIALS
    warmup: int = 1

    def __post_init__(self) -> None:
        if not self.cpus:
            raise ValueError("no CPUs to run on; pick a node with CPUs (--cpu-node)")
        if not self.threads:
            object.__setattr__(self, "threads", thread_counts(len(self.cpus)))
        too_many = [t for t in self.threads if not 1 <= t <= len(self.cpus)]
        if too_many:
            raise ValueError(
                f"thread counts {too_many} do not fit {len(self.cpus)} CPUs {list(self.cpus)}; "
                f"use 1..{len(self.cpus)}"
            )


def expected_rows(config: MemoryConfig, kernels: Kernels) -> int:
    """Rows :func:`measure_memory` yields with these kernels (the fallback runs one thread).

    >>> expected_rows(MemoryConfig(nodes=(0,), cpus=(0, 1), nbytes=1), load_kernels())
    8
    """
    threads = 1 if kernels.degraded else len(config.threads)
    return len(config.nodes) * threads * len(config.kinds)


def stream_stats(
    kernels: Kernels,
    kind: StreamKind,
    addresses: tuple[int, ...],
    nbytes: int,
    cpus: tuple[int, ...],
    *,
    passes: int = 1,
    trials: int = MIN_TRIALS,
    warmup: int = 1,
) -> TrialStats:
    """GiB/s of ``kind`` over arrays of ``nbytes`` at ``addresses``, threads on ``cpus``.

    >>> import numpy as np
    >>> a = np.ones(1 << 17)
    >>> stream_stats(load_kernels(), "read", (a.ctypes.data,), a.nbytes, (0,)).median > 0
    True
    """
    moved = STREAM_TRAFFIC[kind] * nbytes * passes

    def trial() -> float:
        return moved / kernels.stream_seconds(kind, addresses, nbytes, cpus, passes) / GIB

    return repeat(trial, trials=trials, warmup=warmup)


def measure_memory(config: MemoryConfig, kernels: Kernels | None = None) -> Iterator[ResultRow]:
    """Yield one ``memory`` row (unit GiB/s) per node, thread count and kind.

    Bytes count as STREAM does: read 1, write 1, copy 2, triad 3 and update 3 arrays per pass
    (write-allocate reads not counted; see ``profilers.kernels.STREAM_TRAFFIC``).

    >>> config = MemoryConfig(nodes=(0,), cpus=(0,), nbytes=1 << 20, kinds=("copy",))
    >>> [(r.case, r.unit) for r in measure_memory(config)]
    [('copy', 'GiB/s')]
    """
    kernels = kernels or load_kernels()
    threads = (1,) if kernels.degraded else config.threads
    for node in config.nodes:
        with ExitStack() as stack:
            arrays = [stack.enter_context(placed_memory(config.nbytes, node)) for _ in range(3)]
            addresses = tuple(a.address for a in arrays)
            for count in threads:
                cpus = config.cpus[:count]
                for kind in config.kinds:
                    stats = stream_stats(
                        kernels,
                        kind,
                        addresses[: STREAM_ARRAYS[kind]],
                        config.nbytes,
                        cpus,
                        passes=config.passes,
                        trials=config.trials,
                        warmup=config.warmup,
                    )
                    yield ResultRow.from_stats(
                        "memory",
                        kind,
                        arrays[0].label,
                        config.nbytes,
                        "GiB/s",
                        stats,
                        threads=count,
                        page_size=arrays[0].page_size,
                        kernel=kernels.name,
                        degraded=kernels.degraded,
                        note=kernels.note or f"cpus {','.join(map(str, cpus))}",
                    )
