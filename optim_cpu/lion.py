"""CPULion: the Lion optimizer (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
a sign update and one momentum state, over fp32 master params in host memory.

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


class CPULion(HostOptimizer):
    """Lion: ``c = b1*m + (1-b1)*g; p = p*(1 - lr*wd) - lr*sign(c); m = b2*m + (1-b2)*g``.

    Decoupled weight decay as in the paper and its reference code; one state, ``exp_avg``
    (tensor class "optimizer_state"). Arguments as :class:`CPUAdamW` (defaults lr 1e-4,
    betas (0.9, 0.99), weight_decay 0).

    >>> p = torch.zeros(3, requires_grad=True)
    >>> opt = CPULion([p], lr=0.1)
    >>> (p * torch.tensor([1.0, -1.0, 0.0])).sum().backward(); opt.step(); p.tolist()
    [-0.10000000149011612, 0.10000000149011612, 0.0]
    """

    _STATE = (("exp_avg", OPTIMIZER_STATE),)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        **options: Unpack[HostOptimizerOptions],
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay}
        super().__init__(params, defaults, **options)

    def _check_hparams(self, group: dict[str, Any], *, where: str) -> None:
        check_number(group, "lr", 0.0, _INF, where=where)
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
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        exp_avg = state["exp_avg"]

        def run(begin: int, end: int) -> None:
            kernel.lion_step(p, grad, exp_avg, out, begin, end, lr, beta1, beta2, wd)

        return run
