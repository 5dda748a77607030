"""Host bytes of the activations one training step offloads, per activation mode, from a
Llama-like decoder's shape (transformers' LlamaForCausalLM with SDPA attention). Sizes only: it
must not look at a model object, allocate or time anything.

What the saved-tensor hooks see, per token (b x s of them), at compute dtype bytes ``e``: each
RMSNorm saves its fp32 upcast input (4h), its fp32 rsqrt (4) and the normalised value cast back
(e h); the q/k/v projections save the norm output they read once between them, and so do
gate/up (each saves a fresh view, which the runtime shares while the norm output lives); rotary
saves cos and sin (e d each, per position, once for all layers: every layer views the same
tensors); SDPA saves q, k, v, its output and an fp32 logsumexp per head; o_proj
and down_proj save their inputs; the gated MLP saves gate, SiLU(gate) and up. Outside the layers:
the token ids, the final norm, lm_head's input and the loss's fp32 log-probs (log_softmax and
nll_loss save the same tensor, which the runtime stores once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from allocators.errors import ConfigError
from allocators.host_pool import size_class
from offload.planning.model_shapes import ModelShape

ActivationMode = Literal["saved_tensors", "checkpoint", "off"]
ACTIVATION_MODES: tuple[ActivationMode, ...] = get_args(ActivationMode)
# offload.enable()'s own default for activation_min_nbytes: smaller saved tensors stay put.
DEFAULT_MIN_NBYTES = 1 << 20


@dataclass(frozen=True)
class SavedTensor:
    """``count`` saved tensors of ``nbytes`` each, named after what saves them."""

    name: str
    nbytes: int
    count: int


@dataclass(frozen=True)
class ActivationEstimate:
    """The activations one step offloads: ``moved_nbytes`` copied to the host, ``host_nbytes``
    the host pool charges for them (each buffer rounded up to its size class), and ``parts``
    (name, host bytes), which add up to ``host_nbytes``. Only saves of at least ``min_nbytes``
    count.

    >>> shape = ModelShape("tiny", 2, 64, 128, 4, 2, 16, 100)
    >>> est = estimate_activations(shape, batch=1, seq=256, mode="checkpoint", min_nbytes=0)
    >>> est.parts[1], est.host_nbytes >= est.moved_nbytes
    (('layer inputs', 65536), True)
    """

    mode: ActivationMode
    moved_nbytes: int
    host_nbytes: int
    parts: tuple[tuple[str, int], ...]


def saved_tensors(
    shape: ModelShape,
    *,
    batch: int,
    seq: int,
    mode: ActivationMode = "saved_tensors",
    dtype_nbytes: int = 2,
    loss_chunk_tokens: int | None = None,
) -> tuple[SavedTensor, ...]:
    """Every tensor the runtime's hooks see saved in one forward of ``batch`` x ``seq`` tokens.

    ``mode`` "checkpoint" keeps each layer's input only (the layers recompute the rest); with
    ``loss_chunk_tokens`` the loss keeps each chunk's hidden slice and targets, not log-probs.

    >>> shape = ModelShape("tiny", 2, 64, 128, 4, 2, 16, 100)
    >>> [t.name for t in saved_tensors(shape, batch=1, seq=8, mode="checkpoint")][:2]
    ['token ids (int64)', 'layer inputs']
    """
    _check_mode(mode)
    if mode == "off":
        return ()
    b, s, e = batch, seq, dtype_nbytes
    t = b * s
    h, d, q_heads, kv_heads = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    layers, inter = shape.layers, shape.intermediate
    out = [SavedTensor("token ids (int64)", 8 * t, 1)]
    if mode == "checkpoint":
        out.append(SavedTensor("layer inputs", e * t * h, layers))
    else:
        out += _norm(t, h, e, 2 * layers)
        out += [
            # F.linear saves a fresh 2-D view of its 3-D input per call; the runtime shares one
            # host copy while the view's base (the norm output) lives: one for q/k/v, one for
            # gate/up.
            SavedTensor("q/k/v and gate/up input", e * t * h, 2 * layers),
            # cos and sin are [1, s, d] (positions shared by the batch), made once per forward
            # and viewed by every layer: shared the same way.
            SavedTensor("rotary cos, sin", e * s * d, 2),
            SavedTensor("attention q and output", e * t * q_heads * d, 2 * layers),
            # No padding mask: SDPA runs with enable_gqa, so k and v keep their kv heads.
            SavedTensor("attention k, v", e * t * kv_heads * d, 2 * layers),
            SavedTensor("attention logsumexp (fp32)", 4 * t * q_heads, layers),
            SavedTensor("o_proj input", e * t * q_heads * d, layers),
            SavedTensor("mlp gate, silu(gate), up, down input", e * t * inter, 4 * layers),
        ]
    out += _norm(t, h, e, 1)
    out += _loss(t, h, e, shape.vocab, loss_chunk_tokens)
    return tuple(out)


def _norm(tokens: int, hidden: int, e: int, count: int) -> list[SavedTensor]:
    # RMSNorm upcasts to fp32 whatever the dtype: in fp32 the "upcast" is its input itself.
    return [
        SavedTensor("rmsnorm fp32 input", 4 * tokens * hidden, count),
        SavedTensor("rmsnorm rsqrt (fp32)", 4 * tokens, count),
        SavedTensor("rmsnorm normalised", e * tokens * hidden, count),
    ]


def _loss(tokens: int, h: int, e: int, vocab: int, chunk: int | None) -> list[SavedTensor]:
    if chunk is None:
        return [
            SavedTensor("lm_head input", e * tokens * h, 1),
            SavedTensor("loss log-probs (fp32)", 4 * tokens * vocab, 1),
            SavedTensor("loss targets (int64)", 8 * tokens, 1),
            SavedTensor("loss total weight (fp32)", 4, 1),
        ]
    full, rest = divmod(tokens, chunk)
    out = [
        SavedTensor("loss chunk hidden", e * chunk * h, full),
        SavedTensor("loss chunk targets (int64)", 8 * chunk, full),
        # The summed loss is divided by the count of targets, an int64 scalar it saves.
        SavedTensor("loss target count (int64)", 8, 1),
    ]
    if rest:
        out += [
            SavedTensor("loss chunk hidden", e * rest * h, 1),
            SavedTensor("loss chunk targets (int64)", 8 * rest, 1),
        ]
    return out


def estimate_activations(
    shape: ModelShape,
    *,
    batch: int,
    seq: int,
    mode: ActivationMode = "saved_tensors",
    dtype_nbytes: int = 2,
    min_nbytes: int = DEFAULT_MIN_NBYTES,
    loss_chunk_tokens: int | None = None,
) -> ActivationEstimate:
    """Host bytes of one step's offloaded activations (saves of at least ``min_nbytes``).

    On Qwen2.5-7B's shape at 4096 tokens, chunked loss, saved-tensors mode moves about 30x
    what checkpoint mode moves:

    >>> from offload.planning.model_shapes import MODELS
    >>> shape = MODELS["qwen2.5-7b"]
    >>> full = estimate_activations(shape, batch=1, seq=4096, loss_chunk_tokens=4096)
    >>> ckpt = estimate_activations(shape, batch=1, seq=4096, mode="checkpoint",
    ...                             loss_chunk_tokens=4096)
    >>> round(full.moved_nbytes / 2**30, 1), round(ckpt.moved_nbytes / 2**30, 2)
    (24.9, 0.88)
    """
    kept = [
        item
        for item in saved_tensors(
            shape,
            batch=batch,
            seq=seq,
            mode=mode,
            dtype_nbytes=dtype_nbytes,
            loss_chunk_tokens=loss_chunk_tokens,
        )
        if item.nbytes >= min_nbytes and item.nbytes > 0
    ]
    parts: dict[str, int] = {}
    for item in kept:
        parts[item.name] = parts.get(item.name, 0) + size_class(item.nbytes) * item.count
    return ActivationEstimate(
        mode=mode,
        moved_nbytes=sum(item.nbytes * item.count for item in kept),
        host_nbytes=sum(parts.values()),
        parts=tuple(parts.items()),
    )


def _check_mode(mode: object) -> None:
    if mode not in ACTIVATION_MODES:
        raise ConfigError(
            f"activations = {mode!r} is not a mode; write one of {', '.join(ACTIVATION_MODES)}"
        )
