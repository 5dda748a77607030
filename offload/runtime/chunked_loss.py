"""The causal-LM loss in chunks of tokens, so the [tokens, vocab] logits never exist whole on the
device (at 32K tokens and a 152K vocabulary they take 20 GB in fp32, more than the layers' own
activations). It must not change the loss: the same sum of cross-entropies over the same targets.

Each chunk's logits are computed inside a non-reentrant checkpoint and recomputed in backward, so
only one chunk's logits are alive at a time; the price is one more lm_head matmul per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from allocators.errors import ConfigError

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    # fp32 logits, as transformers' ForCausalLMLoss upcasts before the cross-entropy.
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels``, ``chunk_tokens`` at a time.

    Targets are ``labels`` shifted left by one (the last position predicts nothing), positions
    labelled -100 are ignored, and the sum is divided by ``num_items_in_batch`` when given, else
    by the number of counted targets: transformers' ForCausalLMLoss, term for term.

    >>> _ = torch.manual_seed(0); head = nn.Linear(8, 11, bias=False)
    >>> hidden, labels = torch.randn(2, 6, 8), torch.randint(0, 11, (2, 6))
    >>> full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    >>> bool(torch.allclose(chunked_causal_lm_loss(hidden, head, labels, 4), full))
    True
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ConfigError(f"chunk_tokens = {chunk_tokens!r} must be a positive integer, e.g. 4096")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.to(flat.device)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        if flat.requires_grad:
            part = checkpoint(
                _chunk_loss_sum, flat[start:stop], targets[start:stop], head, use_reentrant=False
            )
        else:
            part = _chunk_loss_sum(flat[start:stop], targets[start:stop], head)
        total = total + part
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def check_supports_chunked_loss(model: nn.Module) -> None:
    """Refuse a model whose loss is not ``lm_head(base(...))`` cross-entropy.

    >>> check_supports_chunked_loss(nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    allocators.errors.ConfigError: loss_chunk_tokens needs a transformers causal LM with .model and .lm_head (a *ForCausalLM); Linear has neither: drop loss_chunk_tokens
    """
    name = type(model).__name__
    if not isinstance(getattr(model, "model", None), nn.Module) or not isinstance(
        getattr(model, "lm_head", None), nn.Module
    ):
        raise ConfigError(
            "loss_chunk_tokens needs a transformers causal LM with .model and .lm_head "
            f"(a *ForCausalLM); {name} has neither: drop loss_chunk_tokens"
        )
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ConfigError(
                f"{name} transforms its logits ({attr}={getattr(config, attr)!r}), which the "
                "chunked loss does not reproduce: drop loss_chunk_tokens for this model"
            )


class ChunkedLossPatch:
    """While installed, ``model(..., labels=...)`` computes its loss in chunks of tokens and
    returns ``logits=None`` (the point is never to hold them); without labels the model's own
    forward runs. Instance-level: module hooks (ours, the user's) still run around it.

    >>> from offload.tools.tiny_finetune import tiny_llama
    >>> model = tiny_llama()
    >>> ids = torch.randint(0, model.config.vocab_size, (1, 16))
    >>> reference = model(input_ids=ids, labels=ids).loss
    >>> patch = ChunkedLossPatch(model, chunk_tokens=5)
    >>> out = model(input_ids=ids, labels=ids)
    >>> out.logits is None, bool(torch.allclose(out.loss, reference, atol=1e-6))
    (True, True)
    >>> patch.remove(); "forward" in vars(model)
    False
    """

    def __init__(self, model: nn.Module, chunk_tokens: int) -> None:
        check_supports_chunked_loss(model)
        self.model = model
        self.chunk_tokens = chunk_tokens
        self._had_forward = "forward" in vars(model)
        self._saved_forward = vars(model).get("forward")
        model.forward = self._make_forward(model.forward)

    def _make_forward(self, original: Callable) -> Callable:
        model, chunk_tokens = self.model, self.chunk_tokens

        def forward(*args, labels=None, **kwargs):
            if labels is None:
                return original(*args, **kwargs)
            from transformers.modeling_outputs import CausalLMOutputWithPast

            kwargs.pop("logits_to_keep", None)
            num_items = kwargs.pop("num_items_in_batch", None)
            kwargs["use_cache"] = False
            outputs = model.model(*args, **kwargs)
            loss = chunked_causal_lm_loss(
                outputs[0], model.lm_head, labels, chunk_tokens, num_items
            )
            return CausalLMOutputWithPast(
                loss=loss,
                logits=None,
                hidden_states=getattr(outputs, "hidden_states", None),
                attentions=getattr(outputs, "attentions", None),
            )

        return forward

    def remove(self) -> None:
        """Give the model back the forward it had (its class's, or its own instance one)."""
        if self._had_forward:
            self.model.forward = self._saved_forward
        else:
            vars(self.model).pop("forward", None)
