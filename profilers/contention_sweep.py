"""Interference between the CPU optimizer and DMA on one node: copy bandwidth while AdamW steps,
and AdamW step time while copies run. Without a GPU the copies come from a CPU thread running
the copy kernel, and those rows are labelled ``emulated``. Measures only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

from allocators.placement import as_placement
from profilers.background_load import BackgroundLoad
from profilers.dma_bandwidth import copy_gib_per_s, copy_pairs, pair_stats, reps_for
from profilers.kernels import Kernels, load_kernels
from profilers.optimizer_step import placed_adamw, step_ms
from profilers.placed_memory import placed_memory
from profilers.result_row import ResultRow, placement_label
from profilers.trial_stats import MIN_TRIALS, TrialStats, repeat

MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class ContentionConfig:
    """The node under test, its CPUs, the optimizer size and the copy size.

    The emulated copy thread runs on the node's last CPU; AdamW gets the others (at least one).

    >>> ContentionConfig(node=0, cpus=(0, 1), elements=1 << 20, copy_nbytes=1 << 20, gpu=False).optimizer_threads
    1
    """

    node: int
    cpus: tuple[int, ...]
    elements: int
    copy_nbytes: int
    gpu: bool
    trials: int = MIN_TRIALS
    warmup: int = 1

    @property
    def optimizer_threads(self) -> int:
        return max(1, len(self.cpus) - 1)


def expected_rows(config: ContentionConfig) -> int:
    """Four emulated rows, three more with a GPU.

    >>> expected_rows(ContentionConfig(node=0, cpus=(0,), elements=1, copy_nbytes=1, gpu=True))
    7
    """
    return 4 + (3 if config.gpu else 0)


def _while_running(
    work: Callable[[], float], measure: Callable[[], TrialStats]
) -> tuple[TrialStats, float]:
    """Stats of ``measure`` while ``work`` loops in the background, and the background's rate."""
    load = BackgroundLoad(work)
    load.start()
    try:
        stats = measure()
    finally:
        rate = load.stop()
    return stats, rate


def measure_contention(
    config: ContentionConfig, kernels: Kernels | None = None
) -> Iterator[ResultRow]:
    """Yield ``contention`` rows: AdamW ms/step and copy GiB/s, each idle and under the other.

    >>> config = ContentionConfig(node=0, cpus=(0, 1), elements=1 << 16, copy_nbytes=1 << 20, gpu=False)
    >>> [r.emulated for r in measure_contention(config)]
    [False, True, True, True]
    """
    kernels = kernels or load_kernels()
    placement = as_placement(config.node)
    label = placement_label(placement)
    copy_cpu = (config.cpus[-1],)
    n = config.copy_nbytes
    with ExitStack() as stack:
        opt, kernel = stack.enter_context(
            placed_adamw(
                config.elements,
                placement,
                "optim_cpu",
                cpu_node=config.node,
                threads=config.optimizer_threads,
            )
        )
        src, dst = (stack.enter_context(placed_memory(n, config.node)) for _ in range(2))
        copy_args = ("copy", (src.address, dst.address), n, copy_cpu, 1)

        def adamw_stats() -> TrialStats:
            return repeat(lambda: step_ms(opt), trials=config.trials, warmup=config.warmup)

        def copy_stats() -> TrialStats:
            return repeat(
                lambda: 2 * n / kernels.stream_seconds(*copy_args) / GIB,
                trials=config.trials,
                warmup=config.warmup,
            )

        def copy_bytes() -> float:
            kernels.stream_seconds(*copy_args)
            return 2 * n

        def one_step() -> float:
            opt.step()
            return 1.0

        common = {
            "elements": config.elements,
            "kernel": kernel,
            "threads": config.optimizer_threads,
        }
        emulated = {
            "emulated": True,
            "kernel": kernels.name,
            "threads": 1,
            "degraded": kernels.degraded,
        }
        yield ResultRow.from_stats(
            "contention", "adamw idle", label, config.elements * 16, "ms", adamw_stats(), **common
        )
        yield ResultRow.from_stats(
            "contention", "emulated dma idle", label, n, "GiB/s", copy_stats(), **emulated
        )
        stats, rate = _while_running(copy_bytes, adamw_stats)
        yield ResultRow.from_stats(
            "contention", "adamw + emulated dma", label, config.elements * 16, "ms", stats,
            emulated=True, note=f"copy thread on CPU {copy_cpu[0]} ran at {rate / GIB:.3g} GiB/s meanwhile",
            **common,
        )  # fmt: skip
        stats, rate = _while_running(one_step, copy_stats)
        yield ResultRow.from_stats(
            "contention", "emulated dma + adamw", label, n, "GiB/s", stats,
            note=f"AdamW ran at {1e3 / rate if rate else float('nan'):.3g} ms/step meanwhile", **emulated,
        )  # fmt: skip
        if config.gpu:
            yield from _gpu_rows(config, label, adamw_stats, one_step, common)


def _gpu_rows(
    config: ContentionConfig, label: str, adamw_stats, one_step, common: dict
) -> Iterator[ResultRow]:
    """Real DMA (H2D and D2H at once against a pinned buffer on the node) against AdamW."""
    import torch

    n = config.copy_nbytes
    device = torch.empty(2 * n, dtype=torch.uint8, device="cuda")
    with placed_memory(2 * n, config.node, page_size="2MiB", pin=True) as mem:
        mem.require_pinned()
        host = mem.buffer.tensor(torch.uint8, (2 * n,))
        rows = _dma_against_adamw(
            config, label, copy_pairs("both", host, device, n, 1), adamw_stats, one_step, common
        )
        del host
    yield from rows


def _dma_against_adamw(
    config: ContentionConfig, label: str, pairs: list, adamw_stats, one_step, common: dict
) -> list[ResultRow]:
    n = config.copy_nbytes
    reps = reps_for(n)

    def dma_stats() -> TrialStats:
        return pair_stats(pairs, n, trials=config.trials, warmup=config.warmup)

    def dma_bytes() -> float:
        copy_gib_per_s(pairs, reps)
        return 2.0 * n * reps

    extra = {"streams": 2, "memory": "pinned", "kernel": "HostBuffer"}
    rows = [ResultRow.from_stats("contention", "dma idle", label, n, "GiB/s", dma_stats(), **extra)]
    stats, rate = _while_running(one_step, dma_stats)
    rows.append(
        ResultRow.from_stats(
            "contention", "dma + adamw", label, n, "GiB/s", stats,
            note=f"AdamW ran at {1e3 / rate if rate else float('nan'):.3g} ms/step meanwhile", **extra,
        )
    )  # fmt: skip
    stats, rate = _while_running(dma_bytes, adamw_stats)
    rows.append(
        ResultRow.from_stats(
            "contention", "adamw + dma", label, config.elements * 16, "ms", stats,
            note=f"DMA ran at {rate / GIB:.3g} GiB/s meanwhile", **common,
        )
    )  # fmt: skip
    return rows
