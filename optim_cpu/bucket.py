"""A bucket: the params (and optionally their grads and half-precision outputs) stepped together.

Plain data checked for matching lengths; what a grad or output must look like is checked by the
optimizer that steps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Bucket:
    """Params to step now, with the grads to read and where to write their bf16/fp16 copies.

    ``grads=None`` reads each param's bound grad buffer, else ``param.grad``; ``outputs=None``
    writes to each param's bound output buffer, if any. An entry may be None to mean the same.

    >>> p = torch.zeros(3)
    >>> len(Bucket([p], grads=[torch.ones(3, dtype=torch.bfloat16)]).params)
    1
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor | None] | None = None
    outputs: Sequence[torch.Tensor | None] | None = None

    def __post_init__(self) -> None:
        params = (self.params,) if isinstance(self.params, torch.Tensor) else tuple(self.params)
        object.__setattr__(self, "params", params)
        for name in ("grads", "outputs"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            if len(value) != len(params):
                raise ValueError(
                    f"Bucket has {len(params)} params but {len(value)} {name}; give one per "
                    f"param (None for the default) or leave {name}=None"
                )
            object.__setattr__(self, name, value)
