"""Drop the references DeepSpeed 0.19 keeps to a destroyed engine in module-level state, so its
host buffers can be freed before the process exits. It forgets references; it must not free memory.

Found by walking the referrers of a destroyed ZeRO-3 engine (deepspeed 0.19.8): the model stays in
``parameter_offload.FWD_MODULE_STACK`` (appended at setup, never popped),
``PartitionedParameterCoordinator.__params_to_release`` is an unbounded ``functools.lru_cache`` on
a method, whose keys hold every coordinator and sub-module it was called with, and the engine's
forward hooks on the model (not removed by ``destroy()``) keep the engine alive with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ForgottenReferences:
    """What :func:`forget_engine` removed: module stack entries, cached calls, model hooks."""

    module_stack_entries: int
    cached_calls: int
    model_hooks: int


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


# The engine's own hooks on its model (deepspeed 0.19 engine.py), left there by destroy().
_ENGINE_MODEL_HOOKS = (
    "module_forward_pre_hook",
    "module_forward_post_hook",
    "first_dataloader_check",
)

# What ZeRO sets on every parameter to reach its optimizer (deepspeed 0.19 stage_1_and_2.py, stage3.py).
_OPTIMIZER_ON_PARAMS = ("_zero_optimizer", "_z3_optimizer")


def forget_engine(engine: Any) -> ForgottenReferences:
    """Remove a destroyed engine's model from ZeRO-3's module stack, take the engine's forward
    hooks off the model (so a model the caller keeps does not keep the engine), and empty
    ZeRO-3's per-call cache of parameters to release (shared by every engine; live ones
    refill it). The engine is unusable afterwards, as it is after ``destroy()``.

    Call it only after ``engine.destroy()``, as ``DeepSpeedRun.close`` does.

    >>> forget_engine(run.engine)  # doctest: +SKIP
    ForgottenReferences(module_stack_entries=1, cached_calls=10, model_hooks=2)
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    module: nn.Module = engine.module
    hooks = 0
    for name in _ENGINE_MODEL_HOOKS:
        handle = getattr(engine, name, None)
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
            setattr(engine, name, None)
            hooks += 1
    for param in module.parameters():
        for name in _OPTIMIZER_ON_PARAMS:
            if name in vars(param):
                delattr(param, name)
    stack = parameter_offload.FWD_MODULE_STACK
    kept = [m for m in stack if m is not module]
    removed = len(stack) - len(kept)
    stack[:] = kept
    cached = 0
    for cache in _method_caches(PartitionedParameterCoordinator):
        cached += cache.cache_info().currsize
        cache.cache_clear()
    return ForgottenReferences(removed, cached, hooks)
