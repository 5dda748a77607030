"""Patch the user's optimizer object in place so its step, zero_grad, state_dict and
load_state_dict run the offloaded optimizer (and a DeepSpeed-style clip_grad_norm clips the host
gradients), and put the original attributes back on remove().
It must not change the optimizer's class, its param_groups, or anything of another object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from offload.runtime.deferred_interrupt import DeferredInterrupt
from offload.runtime.optimizer_offload import OptimizerOffload

PATCHED_METHODS = ("step", "zero_grad", "state_dict", "load_state_dict", "clip_grad_norm")
_ABSENT = object()


class OptimizerPatch:
    """Instance-level patch of ``optimizer``; LR schedulers keep working (they only edit lr).

    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> from allocators.sysfs_topology import discover
    >>> from offload.runtime.host_memory import HostMemory
    >>> from offload.runtime.streams import CopyStreams
    >>> mem = HostMemory(discover(), {"dram": "1GiB"})
    >>> off = OptimizerOffload(opt, mem, CopyStreams(torch.device("cpu")))
    >>> patch = OptimizerPatch(opt, off)
    >>> "step" in vars(opt)
    True
    >>> patch.remove(); off.close(); mem.close(); "step" in vars(opt)
    False
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        offload: OptimizerOffload,
        on_step: Callable[[], None] | None = None,
        on_step_start: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.offload = offload
        self._saved = {name: vars(optimizer).get(name, _ABSENT) for name in PATCHED_METHODS}
        on_step = on_step or (lambda: None)
        on_step_start = on_step_start or (lambda: None)

        def step(closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            # What an LR scheduler's own wrapper would record: step() ran before scheduler.step().
            optimizer._opt_called = True
            # A step is all-or-nothing (with overlap_step=False): a Ctrl-C waits for its end.
            with DeferredInterrupt():
                on_step_start()
                offload.step()
                on_step()
            return loss

        # A scheduler built after enable() sees this and does not wrap step again.
        step._wrapped_by_lr_sched = True

        def zero_grad(set_to_none: bool = True):
            offload.zero_grad()

        def clip_grad_norm(max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
            # DeepSpeed's (and fairscale's) optimizers clip themselves: code written for them
            # calls this on the optimizer, over every parameter it steps.
            return offload.clip_grad_norm_([s.param for s in offload.slots], max_norm, norm_type)

        optimizer.step = step
        optimizer.zero_grad = zero_grad
        optimizer.clip_grad_norm = clip_grad_norm
        optimizer.state_dict = offload.state_dict
        optimizer.load_state_dict = offload.load_state_dict

    def remove(self) -> None:
        """Put back exactly the instance attributes that were there before (or none)."""
        for name, value in self._saved.items():
            if value is _ABSENT:
                vars(self.optimizer).pop(name, None)
            else:
                setattr(self.optimizer, name, value)
