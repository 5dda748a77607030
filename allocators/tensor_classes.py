"""Tensor classes an offloaded training step or a long-context decode keeps in host memory, and
the item a policy places. Names and sizes only: what a model needs is sized in offload.planning.
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
    """One item a policy places whole, in order: its tensor classes, size and who touches it.

    The paper's greedy visits seven items one by one (Adam momentum, Adam variance, master grads,
    master weights, compute weights, activation checkpoints, compute grads), so each is placed
    on its own even where several make up one of the paper's groups: ``group`` names that group
    (e.g. ``"latency_critical"`` for the first four; empty: the item is a group of its own).
    ``parts`` lists the named pieces that add up to ``nbytes``, so a table can show where the
    bytes come from. ``cpu_touched`` marks data the CPU optimizer reads and writes every step
    (latency- and bandwidth-critical); the rest is streamed by DMA.

    >>> g = TensorGroup("compute_params", ("params",), 2000, False, (("bf16 weights", 2000),))
    >>> g.nbytes, g.cpu_touched, g.group_name
    (2000, False, 'compute_params')
    """

    name: str
    tensor_classes: tuple[TensorClass, ...]
    nbytes: int
    cpu_touched: bool
    parts: tuple[tuple[str, int], ...]
    group: str = ""

    @property
    def group_name(self) -> str:
        """The paper's group this item belongs to (its own name when it is a group alone)."""
        return self.group or self.name


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
