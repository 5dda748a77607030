"""Tensor classes an offloaded training step or a long-context decode keeps in host memory, and
the group a policy places. Names and sizes only: what a model needs is sized in offload.planning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from allocators.errors import ConfigError

TensorClass = Literal[
    "optimizer_state",
    "master_params",
    "master_grads",
    "grads",
    "params",
    "activations",
    "kv_cache",
]
TENSOR_CLASSES: tuple[TensorClass, ...] = get_args(TensorClass)

OptimizerName = Literal["adam", "adamw", "lion"]
# Bytes of fp32 optimizer state per parameter: Adam(W) keeps momentum and variance, Lion momentum.
STATE_NBYTES_PER_PARAM = {"adam": 8, "adamw": 8, "lion": 4}


@dataclass(frozen=True)
class TensorGroup:
    """One of the paper's host tensor groups: its tensor classes, size and who touches it.

    ``parts`` lists the named pieces that add up to ``nbytes`` (e.g. Adam momentum 4P), so a
    table can show where the bytes come from. ``cpu_touched`` marks data the CPU optimizer reads
    and writes every step (latency- and bandwidth-critical); the rest is streamed by DMA.

    >>> g = TensorGroup("compute_params", ("params",), 2000, False, (("bf16 weights", 2000),))
    >>> g.nbytes, g.cpu_touched
    (2000, False)
    """

    name: str
    tensor_classes: tuple[TensorClass, ...]
    nbytes: int
    cpu_touched: bool
    parts: tuple[tuple[str, int], ...]


def check_tensor_class(name: object) -> TensorClass:
    """Return ``name`` as a TensorClass, or raise a ValueError listing the valid ones.

    >>> check_tensor_class("activations")
    'activations'
    """
    if name not in TENSOR_CLASSES:
        raise ConfigError(
            f"tensor class {name!r} is not known; write one of {', '.join(TENSOR_CLASSES)}"
        )
    return name  # type: ignore[return-value]
