"""GPU copy bandwidth (H2D, D2H, both at once) against host buffers placed on each node and mix,
pinned and pageable, 1..N streams, with a plain torch pin_memory copy loop as reference in the
same run. Needs CUDA; measures only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from allocators.placement import Placement
from profilers.placed_memory import placed_memory
from profilers.result_row import ResultRow, placement_label
from profilers.trial_stats import MIN_TRIALS, TrialStats, repeat

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DIRECTIONS = ("h2d", "d2h", "both")
FULL_SIZES = (4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, 2 * GIB)
QUICK_SIZES = (MIB, 256 * MIB)
# The reference loop and the stream sweep run at one size, where copies are long enough for
# launch overhead not to matter and short enough to repeat.
REFERENCE_NBYTES = 256 * MIB
# Each trial copies about this many bytes (at most MAX_REPS copies) so small copies are timed
# over many launches rather than one.
TRIAL_NBYTES = 512 * MIB
MAX_REPS = 1000


@dataclass(frozen=True)
class BandwidthConfig:
    """Placements, copy sizes, stream counts (beyond 1, only at REFERENCE_NBYTES), pageable.

    >>> from allocators.placement import as_placement
    >>> BandwidthConfig(placements=(as_placement(0),)).sizes[-1] == 2 * GIB
    True
    """

    placements: tuple[Placement, ...]
    sizes: tuple[int, ...] = FULL_SIZES
    streams: tuple[int, ...] = (1, 2, 4)
    pageable: bool = True
    trials: int = MIN_TRIALS
    warmup: int = 1
    device: int = 0

    @classmethod
    def quick(cls, placements: tuple[Placement, ...], trials: int = MIN_TRIALS) -> BandwidthConfig:
        """1 MiB and 256 MiB, 1 and 4 streams."""
        return cls(placements=placements, sizes=QUICK_SIZES, streams=(1, 4), trials=trials)


def expected_rows(config: BandwidthConfig) -> int:
    """Rows :func:`measure_bandwidth` yields.

    >>> from allocators.placement import as_placement
    >>> expected_rows(BandwidthConfig(placements=(as_placement(0),), sizes=(1, 2), streams=(1, 4)))
    15
    """
    multi = sum(1 for s in config.streams if s > 1)
    pinned = len(config.sizes) * len(DIRECTIONS) + multi * len(DIRECTIONS)
    pageable = 2 * len(config.sizes) if config.pageable else 0
    return len(config.placements) * (pinned + pageable) + 2


def reps_for(nbytes: int) -> int:
    """Copies per trial: enough to move about TRIAL_NBYTES, between 1 and MAX_REPS.

    >>> reps_for(4096), reps_for(2 << 30)
    (1000, 1)
    """
    return max(1, min(MAX_REPS, TRIAL_NBYTES // nbytes))


def copy_pairs(
    direction: str, host: Any, device: Any, nbytes: int, streams: int
) -> list[tuple[Any, Any]]:
    """(dst, src) views: ``nbytes`` split over ``streams``; ``both`` reads host's first half
    and writes its second, so the two directions never touch the same bytes.

    >>> import torch
    >>> [(d.numel(), s.numel()) for d, s in copy_pairs("both", torch.zeros(8), torch.zeros(8), 4, 2)]
    [(2, 2), (2, 2), (2, 2), (2, 2)]
    """
    chunk = nbytes // streams
    pairs = []
    directions = ("h2d", "d2h") if direction == "both" else (direction,)
    for which, d in enumerate(directions):
        base = which * nbytes
        for i in range(streams):
            lo, hi = base + i * chunk, base + (i + 1) * chunk
            pairs.append(
                (device[lo:hi], host[lo:hi]) if d == "h2d" else (host[lo:hi], device[lo:hi])
            )
    return pairs


def copy_gib_per_s(pairs: list[tuple[Any, Any]], reps: int) -> float:
    """GiB/s of ``reps`` rounds of ``dst.copy_(src)`` for every pair, one CUDA stream per pair,
    timed with CUDA events from a common start to the last stream's end.

    >>> copy_gib_per_s(copy_pairs("h2d", pinned, gpu, 1 << 28, 1), reps=2)  # doctest: +SKIP
    51.3
    """
    import torch

    current = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in pairs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(current)
    for (dst, src), stream in zip(pairs, streams, strict=True):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(reps):
                dst.copy_(src, non_blocking=True)
    for stream in streams:
        current.wait_stream(stream)
    end.record(current)
    end.synchronize()
    moved = reps * sum(dst.numel() * dst.element_size() for dst, _ in pairs)
    return moved / (start.elapsed_time(end) / 1e3) / GIB


def pair_stats(
    pairs: list[tuple[Any, Any]], nbytes: int, *, trials: int, warmup: int
) -> TrialStats:
    """Trial statistics of :func:`copy_gib_per_s` for copies of ``nbytes`` per direction.

    >>> pair_stats(copy_pairs("d2h", pinned, gpu, 1 << 28, 1), 1 << 28, trials=5, warmup=1).median  # doctest: +SKIP
    52.0
    """
    reps = reps_for(nbytes)
    return repeat(lambda: copy_gib_per_s(pairs, reps), trials=trials, warmup=warmup)


def _sweep(
    config: BandwidthConfig, host: Any, device: Any, label: str, memory: str, extra: dict
) -> Iterator[ResultRow]:
    if memory == "pinned":
        cases = [(n, d, 1) for n in config.sizes for d in DIRECTIONS]
        cases += [(REFERENCE_NBYTES, d, s) for s in config.streams if s > 1 for d in DIRECTIONS]
    else:
        cases = [(n, d, 1) for n in config.sizes for d in ("h2d", "d2h")]
    for nbytes, direction, streams in cases:
        pairs = copy_pairs(direction, host, device, nbytes, streams)
        stats = pair_stats(pairs, nbytes, trials=config.trials, warmup=config.warmup)
        yield ResultRow.from_stats(
            "bandwidth",
            direction,
            label,
            nbytes,
            "GiB/s",
            stats,
            streams=streams,
            memory=memory,
            **extra,
        )


def measure_bandwidth(config: BandwidthConfig) -> Iterator[ResultRow]:
    """Yield ``bandwidth`` rows (GiB/s; ``both`` counts the two directions together).

    Placed buffers come from HostBuffer (2 MiB pages); the reference rows copy a
    ``torch.empty(..., pin_memory=True)`` tensor of REFERENCE_NBYTES with the same loop.

    >>> from allocators.placement import as_placement
    >>> rows = list(measure_bandwidth(BandwidthConfig.quick((as_placement(0),))))  # doctest: +SKIP
    """
    import torch

    torch.cuda.set_device(config.device)
    span = 2 * max(max(config.sizes), REFERENCE_NBYTES)
    device = torch.empty(span, dtype=torch.uint8, device=f"cuda:{config.device}")
    for placement in config.placements:
        label = placement_label(placement)
        with placed_memory(span, placement, page_size="2MiB", pin=True) as mem:
            mem.require_pinned()
            host = mem.buffer.tensor(torch.uint8, (span,))
            extra = {"page_size": "2MiB", "kernel": "HostBuffer", "note": mem.note}
            yield from _sweep(config, host, device, label, "pinned", extra)
            del host
        if config.pageable:
            with placed_memory(span, placement, page_size="2MiB", pin=False) as mem:
                host = mem.buffer.tensor(torch.uint8, (span,))
                extra = {"page_size": "2MiB", "kernel": "HostBuffer", "note": mem.note}
                yield from _sweep(config, host, device, label, "pageable", extra)
                del host
    reference = torch.empty(2 * REFERENCE_NBYTES, dtype=torch.uint8, pin_memory=True)
    for direction in ("h2d", "d2h"):
        pairs = copy_pairs(direction, reference, device, REFERENCE_NBYTES, 1)
        stats = pair_stats(pairs, REFERENCE_NBYTES, trials=config.trials, warmup=config.warmup)
        yield ResultRow.from_stats(
            "bandwidth", direction, "pin_memory (NUMA-blind)", REFERENCE_NBYTES, "GiB/s", stats,
            streams=1, memory="pin_memory", kernel="torch copy loop",
        )  # fmt: skip
