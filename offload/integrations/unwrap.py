"""Reach the optimizer offload works on through the wrappers training libraries put around it
(accelerate's AcceleratedOptimizer, or any wrapper exposing ``.optimizer``). It must not change
the wrapper or the optimizer.
"""

from __future__ import annotations

import torch

from allocators.errors import OffloadError


def inner_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer that holds the state, under any wrappers: what ``offload.enable()`` patches.

    A wrapper's ``step()`` ends in the inner optimizer's, so patching the inner one offloads
    steps made through the wrapper too (and accelerate's skipped steps under accumulation stay
    skipped). A wrapper that scales the loss (a ``GradScaler``, fp16) is refused: it reads
    ``param.grad``, which stays empty on the device under offload.

    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    >>> class Wrapper:
    ...     def __init__(self, optimizer): self.optimizer = optimizer
    >>> inner_optimizer(Wrapper(Wrapper(opt))) is opt
    True
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            raise OffloadError(
                f"the optimizer comes wrapped in {type(optimizer).__name__} with a loss scaler "
                "(fp16 mixed precision); the scaler reads param.grad, which offload keeps on the "
                "host, so no step would be taken. Train in bf16 (mixed_precision='bf16', or "
                "bf16=True in TrainingArguments) or fp32 instead"
            )
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not (hasattr(inner, "param_groups") or hasattr(inner, "optimizer")):
            return optimizer
        optimizer = inner
    return optimizer
