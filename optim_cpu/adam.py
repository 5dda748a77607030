"""CPUAdamW and CPUAdam: Adam with decoupled (AdamW) or L2 (Adam) weight decay, exactly as torch.optim
defines them, over fp32 master params and moments in host memory.

Only hyper-parameters and the per-chunk call live here; the contract is in host_optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from optim_cpu.host_optimizer import (
    HostOptimizer,
    HostOptimizerOptions,
    check_betas,
    check_number,
)
from optim_cpu.state_alloc import OPTIMIZER_STATE

if TYPE_CHECKING:
    from typing_extensions import Unpack

_INF = float("inf")


class CPUAdamW(HostOptimizer):
    """AdamW (decoupled weight decay) stepped by a fused SIMD kernel on pinned CPU workers.

    Matches ``torch.optim.AdamW`` (no amsgrad, no maximize). Grads may be fp32, bf16 or fp16
    (``param.grad``, a buffer bound with :meth:`bind_buffers`, or a :class:`Bucket`'s grads);
    the updated param can be written as bf16/fp16 into a bound ``out`` buffer in the same pass.

    Args:
        params: fp32 CPU tensors, or param groups (dicts) with per-group hyper-parameters.
        lr, betas, eps, weight_decay: as in torch.optim.AdamW (defaults 1e-3, (0.9, 0.999),
            1e-8, 1e-2).
        state_allocator: ``allocate(nbytes, tensor_class)`` for the moments, so the placement
            plan decides their NUMA node; both moments are tensor class
            "optimizer_state" (default: plain host memory).
        scheduler: a shared :class:`StepScheduler` (default: one of ``threads`` workers pinned
            to ``numa_node``'s cores, or to ``cpus`` when given, started at the first step).
        cpus: the CPU ids the workers are pinned to, each in this process's affinity mask
            (ignored when ``scheduler`` is given; give ``numa_node`` or ``cpus``, not both).
        chunk_elems: elements per work item (the granularity of pacing and load balance).

    Raises:
        ValueError: a param not fp32/CPU/contiguous, a bad hyper-parameter, a grad of the wrong
            shape or dtype.

    >>> p = torch.ones(4, requires_grad=True)
    >>> opt = CPUAdamW([p], lr=0.1)
    >>> p.sum().backward(); opt.step(); round(p[0].item(), 4)
    0.899
    """

    _STATE = (("exp_avg", OPTIMIZER_STATE), ("exp_avg_sq", OPTIMIZER_STATE))
    _DECOUPLED = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **options: Unpack[HostOptimizerOptions],
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, **options)

    def _check_hparams(self, group: dict[str, Any], *, where: str) -> None:
        check_number(group, "lr", 0.0, _INF, where=where)
        check_number(group, "eps", 0.0, _INF, where=where)
        check_number(group, "weight_decay", 0.0, _INF, where=where)
        check_betas(group, where=where)

    def _step_fn(
        self,
        kernel: ModuleType,
        p: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, Any],
        out: torch.Tensor | None,
        group: dict[str, Any],
        step: int,
    ) -> Callable[[int, int], None]:
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        exp_avg, exp_avg_sq, decoupled = state["exp_avg"], state["exp_avg_sq"], self._DECOUPLED

        def run(begin: int, end: int) -> None:
            kernel.adam_step(
                p, grad, exp_avg, exp_avg_sq, out, begin, end,
                lr, beta1, beta2, eps, wd, step, decoupled,
            )  # fmt: skip

        return run


class CPUAdam(CPUAdamW):
    """Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam`` (default wd 0).

    Same arguments and behaviour as :class:`CPUAdamW` otherwise.

    >>> p = torch.ones(2, requires_grad=True)
    >>> opt = CPUAdam([p], lr=0.1, weight_decay=0.5)
    >>> p.sum().backward(); opt.step(); round(p[0].item(), 4)
    0.9
    """

    _DECOUPLED = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **options: Any) -> None:  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, **options)
