"""accelerate: offload.enable() with what an Accelerator knows (its gradient accumulation, its
wrapped optimizer), in either order with ``accelerator.prepare``. It must not change what
accelerate does; clipping through ``accelerator.clip_grad_norm_`` is routed by
offload.runtime.clip_patch.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from allocators.errors import OffloadError
from offload.enable import enable

# accelerate engines that own gradients and optimizer state themselves.
_OWN_ENGINES = {"DEEPSPEED": "offload.deepspeed.enable", "FSDP": None, "XLA": None}


def enable_with_accelerator(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    **enable_kwargs: Any,
):
    """``offload.enable(model, optimizer, **enable_kwargs)`` with ``grad_accumulation_steps``
    taken from ``accelerator``. ``model`` and ``optimizer`` may be the prepared ones or not.

    Raises:
        OffloadError: accelerate runs DeepSpeed, FSDP or XLA, which keep gradients and optimizer
            state themselves (for DeepSpeed use ``offload.deepspeed.enable``).

    >>> from accelerate import Accelerator
    >>> model = nn.Linear(4, 1); opt = torch.optim.AdamW(model.parameters())
    >>> accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    >>> model, opt = accelerator.prepare(model, opt)
    >>> sess = enable_with_accelerator(accelerator, model, opt, budgets={"dram": "1GiB"})
    >>> sess.config.grad_accumulation_steps
    2
    >>> sess.disable()
    """
    engine = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
    if engine in _OWN_ENGINES:
        instead = _OWN_ENGINES[engine]
        raise OffloadError(
            f"accelerate runs {engine}, which keeps gradients and optimizer state itself; "
            + (f"use {instead} instead" if instead else "offload.enable() cannot run under it")
        )
    settings = {"grad_accumulation_steps": accelerator.gradient_accumulation_steps}
    settings.update(enable_kwargs)
    return enable(model, optimizer, **settings)
