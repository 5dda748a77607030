"""The step kernels written with torch ops, used when the C++ kernel cannot be built.

Same signatures as the C++ ``adam_step``/``lion_step``; Adam(W) goes through torch's fused CPU
kernel. It must stay a drop-in for optim_cpu/csrc/fused_step.cpp, nothing more.
"""

from __future__ import annotations

import torch

NAME = "torch-fused"


@torch.no_grad()
def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    begin: int,
    end: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    decoupled: bool,
) -> None:
    """Adam(W) on elements [begin, end) with torch._fused_adam(w)_; grads upcast to fp32 first.

    >>> p, m, v = torch.ones(4), torch.zeros(4), torch.zeros(4)
    >>> adam_step(p, torch.ones(4), m, v, None, 0, 4, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, True)
    >>> round(p[0].item(), 4)
    0.9
    """
    span = slice(begin, end)
    p = param.view(-1)[span]
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    fused(
        [p],
        [grad.view(-1)[span].float()],
        [exp_avg.view(-1)[span]],
        [exp_avg_sq.view(-1)[span]],
        [],
        [torch.tensor(float(step))],
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
    if out is not None:
        out.view(-1)[span].copy_(p)


@torch.no_grad()
def lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    out: torch.Tensor | None,
    begin: int,
    end: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Lion on elements [begin, end): p -= lr * (sign(b1*m + (1-b1)*g) + wd*p); m = b2*m + (1-b2)*g.

    >>> p, m = torch.ones(2), torch.zeros(2)
    >>> lion_step(p, torch.tensor([1.0, -1.0]), m, None, 0, 2, 0.1, 0.9, 0.99, 0.0)
    >>> [round(x, 4) for x in p.tolist()]
    [0.9, 1.1]
    """
    span = slice(begin, end)
    p = param.view(-1)[span]
    m = exp_avg.view(-1)[span]
    g = grad.view(-1)[span].float()
    p.mul_(1.0 - lr * weight_decay)
    p.add_(torch.sign(m * beta1 + g * (1.0 - beta1)), alpha=-lr)
    m.mul_(beta2).add_(g, alpha=1.0 - beta2)
    if out is not None:
        out.view(-1)[span].copy_(p)
