"""Optimizer state allocation through an injectable hook, so a placement plan picks its NUMA node.

Turns what a hook returns (a uint8 tensor, or a buffer object with ``.tensor(dtype, shape)`` such
as allocators' HostBuffer) into a zeroed tensor; it must not decide placement itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from allocators.tensor_classes import TensorClass

StateAllocator = Callable[[int, str], Any]
"""``allocate(nbytes, tensor_class)`` -> a uint8 CPU tensor of at least nbytes, or an object whose
``.tensor(dtype, shape)`` returns a CPU tensor view (allocators.HostBuffer, TieredAllocator's
allocations)."""

# The tensor class allocators.tensor_classes gives optimizer moments (Adam m and v, Lion m): a
# TieredAllocator plugs in as ``lambda nbytes, cls: tiered.allocate(cls, nbytes)``.
OPTIMIZER_STATE: TensorClass = "optimizer_state"


def allocate_state(
    allocator: StateAllocator | None, tensor_class: TensorClass, like: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """A zeroed fp32 tensor shaped like ``like`` and the object that owns its memory.

    Keep the owner alive as long as the tensor: a hook's buffer may free its pages when dropped.

    >>> t, owner = allocate_state(None, OPTIMIZER_STATE, torch.ones(2, 3))
    >>> t.shape, t.dtype, float(t.sum())
    (torch.Size([2, 3]), torch.float32, 0.0)
    >>> t, _ = allocate_state(lambda n, c: torch.empty(n, dtype=torch.uint8), "x", torch.ones(5))
    >>> t.tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    dtype, shape = torch.float32, tuple(like.shape)
    nbytes = like.numel() * 4
    if allocator is None or nbytes == 0:
        tensor = torch.empty(shape, dtype=dtype)
        owner: Any = tensor
    else:
        owner = allocator(nbytes, tensor_class)
        tensor = _as_tensor(owner, nbytes, tensor_class, dtype, shape)
    # Zeroing is also the first touch, so pages land where the hook's policy says, now.
    tensor.zero_()
    return tensor, owner


def _as_tensor(
    owner: Any, nbytes: int, tensor_class: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    where = f"state_allocator({nbytes}, {tensor_class!r})"
    if isinstance(owner, torch.Tensor):
        if owner.device.type != "cpu" or not owner.is_contiguous():
            raise ValueError(
                f"{where} returned a {owner.device} tensor; return contiguous host memory"
            )
        flat = owner.reshape(-1).view(torch.uint8)
        if flat.numel() < nbytes:
            raise ValueError(
                f"{where} returned {flat.numel()} bytes; it must give at least {nbytes}"
            )
        return flat[:nbytes].view(dtype).view(shape)
    if hasattr(owner, "tensor"):
        tensor = owner.tensor(dtype, shape)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{where}.tensor(float32, {shape}) did not return a tensor of that shape"
            )
        if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{where}.tensor(...) must return a contiguous fp32 CPU tensor")
        return tensor
    raise TypeError(
        f"{where} returned {type(owner).__name__}; return a uint8 CPU tensor of nbytes or an "
        "object with .tensor(dtype, shape), such as allocators' HostBuffer"
    )
