"""Checkpoint offload (the paper's mode): each decoder layer runs under non-reentrant activation
checkpointing, so only its input is saved, and the activation offloader moves that input to the
host. This module only wraps layer forwards; it must not move tensors itself.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Names layers take a KV cache by (transformers uses all of these across models and versions).
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class LayerCheckpointing:
    """Wrap each layer's forward in ``torch.utils.checkpoint`` (non-reentrant); undo with remove().

    Layers already checkpointed by the model (Hugging Face ``gradient_checkpointing_enable``)
    are left alone: their inputs already are the only saved tensors. Under gradients a wrapped
    layer gets no KV cache (``use_cache=False``), as under Hugging Face's own checkpointing.

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
            # A layer that appends to a KV cache would append again when backward replays it
            # (Gemma2 then attends over twice the keys); Hugging Face drops the cache under its
            # own checkpointing for the same reason, so a training forward runs without one.
            for name in _CACHE_KWARGS:
                if kwargs.get(name) is not None:
                    kwargs[name] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
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
