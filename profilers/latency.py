"""Idle load-to-use latency per NUMA node and page size: a dependent pointer chase over buffers
from L1-sized to far past the LLC. Measures only; printing and files belong to the CLI.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from profilers.kernels import Kernels, load_kernels
from profilers.placed_memory import PAGE_SIZES, placed_memory
from profilers.result_row import ResultRow
from profilers.trial_stats import MIN_TRIALS, TrialStats, repeat

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
FULL_SIZES = tuple(16 * KIB << i for i in range(17))  # 16 KiB .. 1 GiB
QUICK_SIZES = (16 * KIB, 256 * KIB, 4 * MIB, 64 * MIB, GIB)
# The numpy fallback pays the interpreter per load; fewer loads keep it to seconds.
DEGRADED_NLOADS = 20_000


@dataclass(frozen=True)
class LatencyConfig:
    """What to chase: nodes, buffer sizes, page sizes, loads per trial and trials.

    >>> LatencyConfig(nodes=(0,), sizes=(16384,)).page_sizes
    ('4KiB', '2MiB')
    """

    nodes: tuple[int, ...]
    sizes: tuple[int, ...] = FULL_SIZES
    page_sizes: tuple[str, ...] = PAGE_SIZES
    nloads: int = 1 << 20
    trials: int = MIN_TRIALS
    warmup: int = 1

    @classmethod
    def quick(cls, nodes: tuple[int, ...], trials: int = MIN_TRIALS) -> LatencyConfig:
        """Five sizes from 16 KiB to 1 GiB and fewer loads: seconds per node."""
        return cls(nodes=nodes, sizes=QUICK_SIZES, nloads=1 << 18, trials=trials)


def sizes_up_to(sizes: tuple[int, ...], max_nbytes: int) -> tuple[int, ...]:
    """``sizes`` below ``max_nbytes``, then ``max_nbytes`` itself.

    >>> sizes_up_to(QUICK_SIZES, 256 * MIB)
    (16384, 262144, 4194304, 67108864, 268435456)
    """
    if max_nbytes < 2 * 64:
        raise ValueError(
            f"largest chase buffer {max_nbytes} B is under two cache lines; write e.g. 1GiB"
        )
    return tuple(s for s in sizes if s < max_nbytes) + (max_nbytes,)


def expected_rows(config: LatencyConfig) -> int:
    """How many rows :func:`measure_latency` yields (for progress bars).

    >>> expected_rows(LatencyConfig(nodes=(0, 1), sizes=(1, 2, 3)))
    12
    """
    return len(config.nodes) * len(config.page_sizes) * len(config.sizes)


def chase_stats(
    kernels: Kernels,
    address: int,
    nbytes: int,
    nloads: int,
    *,
    trials: int = MIN_TRIALS,
    warmup: int = 1,
) -> TrialStats:
    """ns per dependent load over a random cycle through the first ``nbytes`` at ``address``.

    >>> import numpy as np
    >>> buf = np.zeros(1 << 14, dtype=np.uint8)
    >>> chase_stats(load_kernels(), buf.ctypes.data, buf.nbytes, 10_000).median > 0
    True
    """
    kernels.chase_build(address, nbytes)
    if kernels.degraded:
        nloads = min(nloads, DEGRADED_NLOADS)
    return repeat(lambda: kernels.chase_ns_per_load(address, nloads), trials=trials, warmup=warmup)


def measure_latency(config: LatencyConfig, kernels: Kernels | None = None) -> Iterator[ResultRow]:
    """Yield one ``latency``/``chase`` row (unit ns) per node, page size and buffer size.

    One buffer of the largest size is placed per node and page size; smaller sizes chase over
    its first bytes, so each size costs one chase build, not one allocation.

    >>> config = LatencyConfig(nodes=(0,), sizes=(1 << 14,), page_sizes=("4KiB",), nloads=1 << 12)
    >>> [(r.placement, r.unit) for r in measure_latency(config)]
    [('node0', 'ns')]
    """
    kernels = kernels or load_kernels()
    largest = max(config.sizes)
    for node in config.nodes:
        for page_size in config.page_sizes:
            with placed_memory(largest, node, page_size=page_size) as memory:
                thp = memory.thp_fraction() if page_size == "2MiB" else None
                for nbytes in sorted(config.sizes):
                    stats = chase_stats(
                        kernels,
                        memory.address,
                        nbytes,
                        config.nloads,
                        trials=config.trials,
                        warmup=config.warmup,
                    )
                    yield ResultRow.from_stats(
                        "latency",
                        "chase",
                        memory.label,
                        nbytes,
                        "ns",
                        stats,
                        page_size=page_size,
                        kernel=kernels.name,
                        degraded=kernels.degraded,
                        thp_fraction=thp,
                        note=kernels.note,
                    )
