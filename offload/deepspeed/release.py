"""Drop the references DeepSpeed 0.19 keeps to a destroyed engine in module-level state, so its
host buffers can be freed before the process exits. It forgets references; it must not free memory.

Found by walking the referrers of a destroyed ZeRO-3 engine (deepspeed 0.19.8): the model stays in
``parameter_offload.FWD_MODULE_STACK`` (appended at setup, never popped),
``PartitionedParameterCoordinator.__params_to_release`` is an unbounded ``functools.lru_cache`` on
a method, whose keys hold every coordinator and sub-module it was called with, the engine's
forward hooks on the model (not removed by ``destroy()``) and the optimizer ZeRO sets on every
parameter keep the engine alive with the model, and the ``OutputBackwardHookManager`` the engine
attaches to every forward output (``_backward_hook_managers``) keeps it alive with the caller's
last ``loss``.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
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

# What ZeRO sets on every parameter to reach its optimizer (0.19 stage_1_and_2.py, stage3.py).
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


def note_output_hooks(outputs: Any, managers: weakref.WeakSet) -> None:
    """Add the backward hook managers DeepSpeed attached to ``outputs`` (a tensor, or tuples,
    lists and dicts of them, as a forward returns) to ``managers``, without keeping them alive.

    >>> managers = weakref.WeakSet(); note_output_hooks({"loss": torch.ones(1)}, managers)
    >>> len(managers)
    0
    """
    todo = [outputs]
    while todo:
        item = todo.pop()
        if isinstance(item, torch.Tensor):
            managers.update(getattr(item, "_backward_hook_managers", ()))
        elif isinstance(item, tuple | list):
            todo.extend(item)
        elif isinstance(item, Mapping):
            todo.extend(item.values())


def disarm_output_hooks(managers: weakref.WeakSet) -> int:
    """Take a destroyed engine's backward hooks off the outputs that still live, and drop the
    manager's references to the engine; returns how many managers were disarmed.

    >>> disarm_output_hooks(weakref.WeakSet())
    0
    """
    disarmed = 0
    for manager in list(managers):
        manager.remove_hooks()
        manager.preprocess_once_fn = manager.preprocess_per_tensor_fn = None
        disarmed += 1
    managers.clear()
    return disarmed
