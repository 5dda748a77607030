"""CPU AdamW step time per state placement and tensor size, the paper's optimizer experiment:
params, grads and both moments all on host buffers placed as asked. Measures only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from allocators.host_buffer import HostBuffer
from allocators.placement import Placement
from optim_cpu import CPUAdamW
from profilers.result_row import ResultRow, placement_label
from profilers.trial_stats import MIN_TRIALS, TrialStats, repeat

# Tensor sizes of the paper's CPU AdamW table, as whole multiples of 2**18 elements.
PAPER_ELEMENTS = (1_835_008, 12_845_056, 20_971_520, 67_895_296)
QUICK_ELEMENTS = (1_835_008, 20_971_520)
OPTIMIZERS = ("optim_cpu", "torch")


@dataclass(frozen=True)
class OptimizerConfig:
    """Placements, element counts, which AdamW implementations, and the CPUs that step.

    ``optimizers``: ``optim_cpu`` (CPUAdamW, our fused kernel) and/or ``torch``
    (torch.optim.AdamW(fused=True), the reference).

    >>> from allocators.placement import as_placement
    >>> OptimizerConfig(placements=(as_placement(0),), cpu_node=0, threads=2).elements[0]
    1835008
    """

    placements: tuple[Placement, ...]
    cpu_node: int
    threads: int
    elements: tuple[int, ...] = PAPER_ELEMENTS
    optimizers: tuple[str, ...] = OPTIMIZERS
    trials: int = MIN_TRIALS
    warmup: int = 1

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"optimizers {unknown} unknown; write some of {list(OPTIMIZERS)}")


def expected_rows(config: OptimizerConfig) -> int:
    """Rows :func:`measure_optimizer` yields.

    >>> from allocators.placement import as_placement
    >>> expected_rows(OptimizerConfig(placements=(as_placement(0),), cpu_node=0, threads=1))
    8
    """
    return len(config.placements) * len(config.elements) * len(config.optimizers)


@contextmanager
def placed_adamw(
    numel: int, placement: Placement, optimizer: str, *, cpu_node: int, threads: int
) -> Iterator[tuple[Any, str]]:
    """An AdamW over one fp32 param of ``numel`` elements whose param, grad and moments all sit
    on HostBuffers placed per ``placement``; yields (optimizer, kernel label).

    >>> from allocators.placement import as_placement
    >>> with placed_adamw(1024, as_placement(0), "torch", cpu_node=0, threads=1) as (opt, kernel):
    ...     opt.step(); kernel
    'torch-fused'
    """
    buffers: list[HostBuffer] = []

    def allocate(nbytes: int, _tensor_class: str = "") -> HostBuffer:
        buffers.append(HostBuffer(nbytes, placement=placement, pin=False, huge_pages=True))
        return buffers[-1]

    def placed_zeros() -> torch.Tensor:
        return allocate(numel * 4).tensor(torch.float32, (numel,)).zero_()

    param = placed_zeros().fill_(1.0)
    param.grad = placed_zeros().uniform_(-1.0, 1.0)
    if optimizer == "optim_cpu":
        opt: Any = CPUAdamW(
            [param], lr=1e-3, state_allocator=allocate, threads=threads, numa_node=cpu_node
        )
        kernel = f"optim_cpu:{opt.kernel_name}"
    else:
        opt = torch.optim.AdamW([param], lr=1e-3, fused=True)
        # Filling the state before the first step keeps torch from allocating it unplaced.
        opt.state[param] = {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": placed_zeros(),
            "exp_avg_sq": placed_zeros(),
        }
        kernel = "torch-fused"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield opt, kernel
    finally:
        torch.set_num_threads(previous_threads)
        if isinstance(opt, CPUAdamW):
            opt.close()


def step_ms(opt: Any) -> float:
    """Milliseconds of one ``opt.step()``.

    >>> p = torch.ones(4, requires_grad=True); p.grad = torch.ones(4)
    >>> step_ms(torch.optim.AdamW([p])) > 0
    True
    """
    start = time.perf_counter()
    opt.step()
    return (time.perf_counter() - start) * 1e3


def adamw_step_stats(
    numel: int, placement: Placement, optimizer: str, *, cpu_node: int, threads: int,
    trials: int = MIN_TRIALS, warmup: int = 1,
) -> tuple[TrialStats, str]:  # fmt: skip
    """ms per AdamW step over ``numel`` elements placed per ``placement``, and the kernel used.

    >>> from allocators.placement import as_placement
    >>> stats, kernel = adamw_step_stats(1 << 16, as_placement(0), "torch", cpu_node=0, threads=1)
    >>> (stats.trials, kernel)
    (5, 'torch-fused')
    """
    with placed_adamw(numel, placement, optimizer, cpu_node=cpu_node, threads=threads) as (
        opt,
        kernel,
    ):
        return repeat(lambda: step_ms(opt), trials=trials, warmup=warmup), kernel


def measure_optimizer(config: OptimizerConfig) -> Iterator[ResultRow]:
    """Yield one ``optimizer``/``adamw`` row (unit ms per step) per placement, size and kernel.

    >>> from allocators.placement import as_placement
    >>> config = OptimizerConfig((as_placement(0),), 0, 1, elements=(1 << 16,), optimizers=("torch",))
    >>> [(r.case, r.elements) for r in measure_optimizer(config)]
    [('adamw', 65536)]
    """
    for placement in config.placements:
        for numel in config.elements:
            for optimizer in config.optimizers:
                stats, kernel = adamw_step_stats(
                    numel, placement, optimizer, cpu_node=config.cpu_node, threads=config.threads,
                    trials=config.trials, warmup=config.warmup,
                )  # fmt: skip
                yield ResultRow.from_stats(
                    "optimizer", "adamw", placement_label(placement), numel * 16, "ms", stats,
                    threads=config.threads, elements=numel, kernel=kernel,
                    note="fp32 param, grad, exp_avg, exp_avg_sq all on this placement",
                )  # fmt: skip
