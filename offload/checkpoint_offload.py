"""Checkpoint offload (the paper's mode): each decoder layer runs under non-reentrant activation
checkpointing, so only its input is saved, and the activation offloader moves that input to the
host. This module only wraps layer forwards; it must not move tensors itself.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerCheckpointing:
    """Wrap each layer's forward in ``torch.utils.checkpoint`` (non-reentrant); undo with remove().

    Layers already checkpointed by the model (Hugging Face ``gradient_checkpointing_enable``)
    are left alone: their inputs already are the only saved tensors.

    >>> layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    >>> wrapped = LayerCheckpointing(layers)
    >>> layers[1](layers[0](torch.ones(1, 4, requires_grad=True))).sum().backward()
    >>> wrapped.remove(); "forward" in vars(layers[0])
    False
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self._originals: list[tuple[nn.Module, object]] = []
        for layer in layers:
            if getattr(layer, "gradient_checkpointing", False):
                continue
            previous = vars(layer).get("forward")
            self._originals.append((layer, previous))
            layer.forward = self._checkpointed(layer.forward)

    @staticmethod
    def _checkpointed(forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            # preserve_rng_state (the default) makes the recomputation draw the same dropout.
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    def remove(self) -> None:
        """Give every layer back its own forward."""
        for layer, previous in self._originals:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        self._originals = []
