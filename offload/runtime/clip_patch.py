"""Route gradient clipping to the host gradients while offload sessions are active, so a loop,
a Trainer or accelerate that clips still clips. It must not change calls on other parameters.

Under optimizer offload ``param.grad`` is None on the device (gradients leave in buckets), so
any code that reads ``param.grad`` would see no gradient, return a norm of 0 and clip nothing:
silently wrong. Routed: ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``, and
accelerate's ``Accelerator.clip_grad_norm_`` (what Trainer and TRL call; it reads
``param.grad`` itself instead of calling torch's function). Code that imported torch's function by name before
``offload.enable()`` keeps the original; pass ``max_grad_norm`` to ``offload.enable()`` there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.utils.clip_grad as clip_grad_module

from offload.runtime.optimizer_offload import OptimizerOffload

_active: list[OptimizerOffload] = []
_original = torch.nn.utils.clip_grad_norm_
_original_value = torch.nn.utils.clip_grad_value_
# accelerate's Accelerator.clip_grad_norm_ while ours stands in its place (None: not routed).
_accelerate_original: Callable | None = None
# Where accelerate hands clipping to an engine that owns the gradients (FSDP shards, DeepSpeed
# partitions, XLA): not ours to route.
_ENGINE_CLIPS = frozenset({"FSDP", "DEEPSPEED", "XLA"})


def _owner(params: list[torch.Tensor]) -> OptimizerOffload | None:
    for offload in reversed(_active):
        if offload.manages(params):
            return offload
    return None


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, with the gradients of offloaded params read on the host.

    >>> p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.full((4,), 3.0)
    >>> float(clip_grad_norm_([p], 1.0)), round(float(p.grad.norm()), 4)
    (6.0, 1.0)
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    offload = _owner(params)
    if offload is not None:
        return offload.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    return _original(params, max_norm, norm_type, error_if_nonfinite, foreach)


def clip_grad_value_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """``torch.nn.utils.clip_grad_value_``, with the gradients of offloaded params clamped on
    the host (accelerate's ``Accelerator.clip_grad_value_`` calls it too).

    >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([3.0, -0.5])
    >>> clip_grad_value_([p], 1.0); p.grad.tolist()
    [1.0, -0.5]
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    offload = _owner(params)
    if offload is not None:
        return offload.clip_grad_value_(params, clip_value)
    return _original_value(params, clip_value, foreach)


def accelerator_clip_grad_norm_(
    self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2
) -> torch.Tensor:
    """accelerate's ``Accelerator.clip_grad_norm_``, with offloaded params clipped on the host.

    Trainer (and so TRL's trainers) clips through this with ``max_grad_norm`` and logs what it
    returns as ``grad_norm``; it also asks for the norm alone with ``max_norm=inf``.
    """
    params = list(parameters)
    offload = _owner(params)
    engine = getattr(self.distributed_type, "value", self.distributed_type)
    if offload is None or engine in _ENGINE_CLIPS:
        return _accelerate_original(self, params, max_norm, norm_type)
    self.unscale_gradients()
    return offload.clip_grad_norm_(params, max_norm, norm_type)


def _route_accelerate() -> None:
    """Stand in for ``Accelerator.clip_grad_norm_`` once accelerate has been imported; a
    session made before ``import accelerate`` routes it at the model's next forward."""
    global _accelerate_original
    module = sys.modules.get("accelerate.accelerator")
    if module is None or _accelerate_original is not None or not _active:
        return
    _accelerate_original = module.Accelerator.clip_grad_norm_
    module.Accelerator.clip_grad_norm_ = accelerator_clip_grad_norm_


def _unroute_accelerate() -> None:
    global _accelerate_original
    module = sys.modules.get("accelerate.accelerator")
    if module is not None and _accelerate_original is not None:
        module.Accelerator.clip_grad_norm_ = _accelerate_original
    _accelerate_original = None


class ClipPatch:
    """While installed, torch's and accelerate's ``clip_grad_norm_`` clip ``offload``'s host
    gradients (and return their true norm).

    >>> from allocators.sysfs_topology import discover
    >>> from offload.runtime.host_memory import HostMemory
    >>> from offload.runtime.streams import CopyStreams
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> mem = HostMemory(discover(), {"dram": "1GiB"})
    >>> off = OptimizerOffload(opt, mem, CopyStreams(torch.device("cpu")), overlap_step=False)
    >>> patch = ClipPatch(off)
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) > 0
    True
    >>> patch.remove(); off.close(); mem.close()
    >>> torch.nn.utils.clip_grad_norm_ is clip_grad_module.clip_grad_norm_
    True
    """

    def __init__(self, offload: OptimizerOffload) -> None:
        self.offload = offload
        _active.append(offload)
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
        clip_grad_module.clip_grad_norm_ = clip_grad_norm_
        torch.nn.utils.clip_grad_value_ = clip_grad_value_
        clip_grad_module.clip_grad_value_ = clip_grad_value_
        _route_accelerate()

    def refresh(self) -> None:
        """Route accelerate too if it was imported after this session began (cheap: called
        before every forward)."""
        if _accelerate_original is None:
            _route_accelerate()

    def remove(self) -> None:
        """Stop routing this session's params; the last one out puts the originals back."""
        if self.offload in _active:
            _active.remove(self.offload)
        if not _active:
            torch.nn.utils.clip_grad_norm_ = _original
            clip_grad_module.clip_grad_norm_ = _original
            torch.nn.utils.clip_grad_value_ = _original_value
            clip_grad_module.clip_grad_value_ = _original_value
            _unroute_accelerate()
