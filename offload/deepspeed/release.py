"""Drop the references DeepSpeed 0.19 keeps to a destroyed engine in module-level state, so its
host buffers can be freed before the process exits. It forgets references; it must not free memory.

Found by walking the referrers of a destroyed ZeRO-3 engine (deepspeed 0.19.8): the model stays in
``parameter_offload.FWD_MODULE_STACK`` (appended at setup, never popped), and
``PartitionedParameterCoordinator.__params_to_release`` is an unbounded ``functools.lru_cache`` on
a method, whose keys hold every coordinator and sub-module it was called with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ForgottenReferences:
    """What :func:`forget_engine` removed: module stack entries and cached calls."""

    module_stack_entries: int
    cached_calls: int


def _method_caches(cls: type) -> list[Any]:
    """The ``functools.lru_cache`` wrappers among ``cls``'s methods, also under a decorator."""
    caches = []
    for value in vars(cls).values():
        todo, seen = [value], 0
        while todo and seen < 8:
            item = todo.pop()
            seen += 1
            if hasattr(item, "cache_clear") and hasattr(item, "cache_info"):
                caches.append(item)
                continue
            todo.extend(cell.cell_contents for cell in getattr(item, "__closure__", None) or ())
    return caches


def forget_engine(module: nn.Module) -> ForgottenReferences:
    """Remove the destroyed engine's ``module`` from ZeRO-3's module stack and empty ZeRO-3's
    per-call cache of parameters to release (shared by every engine; live ones refill it).

    Call it only after ``engine.destroy()`` (its hooks gone), as ``DeepSpeedRun.close`` does.

    >>> forget_engine(nn.Linear(2, 2)).module_stack_entries  # doctest: +SKIP
    0
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    stack = parameter_offload.FWD_MODULE_STACK
    kept = [m for m in stack if m is not module]
    removed = len(stack) - len(kept)
    stack[:] = kept
    cached = 0
    for cache in _method_caches(PartitionedParameterCoordinator):
        cached += cache.cache_info().currsize
        cache.cache_clear()
    return ForgottenReferences(removed, cached)
