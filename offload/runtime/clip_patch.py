"""Route torch.nn.utils.clip_grad_norm_ to the host gradients while offload sessions are active,
so an unchanged loop that clips still clips. It must not change calls on other parameters.

Under optimizer offload ``param.grad`` is None on the device (gradients leave in buckets), so
torch's own function would see no gradient, return a norm of 0 and clip nothing: silently wrong.
Code that imported the function by name before ``offload.enable()`` keeps the original; pass
``max_grad_norm`` to ``offload.enable()`` there.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.utils.clip_grad as clip_grad_module

from offload.runtime.optimizer_offload import OptimizerOffload

_active: list[OptimizerOffload] = []
_original = torch.nn.utils.clip_grad_norm_


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
    for offload in reversed(_active):
        if offload.manages(params):
            return offload.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite)
    return _original(params, max_norm, norm_type, error_if_nonfinite, foreach)


class ClipPatch:
    """While installed, ``torch.nn.utils.clip_grad_norm_`` clips ``offload``'s host gradients.

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

    def remove(self) -> None:
        """Stop routing this session's params; the last one out puts torch's function back."""
        if self.offload in _active:
            _active.remove(self.offload)
        if not _active:
            torch.nn.utils.clip_grad_norm_ = _original
            clip_grad_module.clip_grad_norm_ = _original
