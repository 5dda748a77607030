"""Where a step ends for a session that does not patch the optimizer (activations only): after
the user's own ``optimizer.step()``, or, with no optimizer, after each backward through the
model. It must not change what the optimizer or backward do; it only calls back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def first_grad_tensor(output: object) -> torch.Tensor | None:
    """The first tensor in a model's output (a tensor, tuple, list, dict or ModelOutput) that
    backward will reach, or None.

    >>> t = torch.ones(1, requires_grad=True) * 2
    >>> first_grad_tensor({"loss": None, "logits": (torch.ones(1), t)}) is t
    True
    """
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    items = output.values() if isinstance(output, dict) else output
    if isinstance(items, (tuple, list)) or isinstance(output, dict):
        for item in items:
            found = first_grad_tensor(item)
            if found is not None:
                return found
    return None


class StepBoundary:
    """Call ``on_step_start`` and ``on_step_end`` around each step: the optimizer's step (torch's
    step hooks, timing it as ``optimizer_ms``) or, with ``optimizer=None``, the end of each
    backward that reaches ``model``'s output.

    >>> model = nn.Linear(2, 1); ends = []
    >>> boundary = StepBoundary(model, None, lambda: None, lambda: ends.append(1))
    >>> model(torch.ones(1, 2)).sum().backward(); ends
    [1]
    >>> boundary.remove()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        on_step_start: Callable[[], None],
        on_step_end: Callable[[], None],
    ) -> None:
        self.on_step_start = on_step_start
        self.on_step_end = on_step_end
        # Host time of the user's last optimizer.step() (0 without an optimizer).
        self.optimizer_ms = 0.0
        self._start_s = 0.0
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(lambda *_: self._step_started()),
                optimizer.register_step_post_hook(lambda *_: self._step_ended()),
            ]
        else:
            self._handles = [model.register_forward_hook(self._after_forward)]

    def _step_started(self) -> None:
        self._start_s = time.perf_counter()
        self.on_step_start()

    def _step_ended(self) -> None:
        self.optimizer_ms = (time.perf_counter() - self._start_s) * 1e3
        self.on_step_end()

    def _after_forward(self, module: nn.Module, args: object, output: object) -> None:
        tensor = first_grad_tensor(output) if torch.is_grad_enabled() else None
        if tensor is not None:
            tensor.register_hook(self._on_output_grad)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        # Backward has reached the output; the row is written once this backward has finished.
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self.on_step_start()
        self.on_step_end()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
