"""The decode-step simulator: how long one token of long-context decoding waits on DMA when the KV
cache lives in host tiers (placed as a plan says) and streams back layer by layer, as TieredKVCache does.

It predicts the DMA side only (a bound on tokens/s); it must not allocate, place or time anything.

What one decode step moves, following offload.kv_cache.cache.TieredKVCache block by block:

- H2D: with fewer device slots than layers (``hbm_layers < layers``) the first
  ``hbm_layers - 2`` layers stay resident and every other layer's stored blocks come back once
  per step (whole blocks of ``block_tokens`` tokens); with a slot per layer nothing comes back.
- D2H: the block holding each layer's new token is copied out whole, once per layer.
- Per copy a fixed latency (simulator_rates.COPY_LATENCY_S) on its stream; the two streams run
  side by side, so the stream with more copies sets the exposed latency.

Bytes are shared over nodes by the placement, and the time is simulator_traffic's memory bound:
the slowest of the PCIe link (each way and both at once) and each node's own DMA ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from allocators.errors import OffloadError
from allocators.placement import Placement
from allocators.tensor_classes import TensorGroup
from offload.planning.host_groups import kv_cache_group
from offload.planning.model_shapes import ModelShape
from offload.planning.simulator.rates import SimRates
from offload.planning.simulator.traffic import Traffic, memory_seconds


class DecodeSimulationError(OffloadError, ValueError):
    """A decode setting the simulator cannot use; the message says what to write instead."""


@dataclass(frozen=True)
class DecodeConfig:
    """How the KV cache runs: device slots, tokens per host block, bytes per K/V element.

    Defaults are TieredKVCache's (2 slots, 1024-token blocks) with bf16 K/V.

    >>> DecodeConfig().block_tokens
    1024
    >>> DecodeConfig(hbm_layers=0)
    Traceback (most recent call last):
    ...
    offload.planning.simulator.decode.DecodeSimulationError: hbm_layers = 0 must be a positive int, e.g. hbm_layers=2
    """

    hbm_layers: int = 2
    block_tokens: int = 1024
    dtype_nbytes: int = 2

    def __post_init__(self) -> None:
        for name in ("hbm_layers", "block_tokens", "dtype_nbytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DecodeSimulationError(
                    f"{name} = {value!r} must be a positive int, e.g. {name}={getattr(DecodeConfig, name)}"
                )


@dataclass(frozen=True)
class DecodePrediction:
    """One decode step's DMA: bytes and copies each way, seconds, and what bounds it.

    ``step_s`` = ``dma_s`` (the memory bound, bottleneck ``bottleneck``) + ``latency_s`` (per-copy
    latency); ``tokens_per_s`` is ``batch / step_s``, the rate DMA alone allows.
    """

    context_tokens: int
    batch: int
    h2d_nbytes: int
    d2h_nbytes: int
    h2d_copies: int
    d2h_copies: int
    streamed_layers: int
    dma_s: float
    latency_s: float
    bottleneck: str

    @property
    def step_s(self) -> float:
        return self.dma_s + self.latency_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.step_s if self.step_s > 0 else float("inf")


def _checked_tokens(context_tokens: int, batch: int) -> None:
    for name, value in (("context_tokens", context_tokens), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DecodeSimulationError(
                f"{name} = {value!r} must be a positive int, e.g. context_tokens=131072, batch=1"
            )


def block_nbytes(shape: ModelShape, batch: int, config: DecodeConfig) -> int:
    """Bytes of one host block of one layer: K and V of ``block_tokens`` tokens, as the cache
    allocates them ([2, batch, kv_heads, block_tokens, head_dim]).

    >>> from offload.planning.model_shapes import MODELS
    >>> block_nbytes(MODELS["llama-1.1b"], 1, DecodeConfig()) == 1 << 20
    True
    """
    return 2 * batch * shape.kv_heads * config.block_tokens * shape.head_dim * config.dtype_nbytes


def kv_cache_group_for(
    shape: ModelShape, context_tokens: int, batch: int = 1, config: DecodeConfig | None = None
) -> TensorGroup:
    """The kv_cache group of a decode up to ``context_tokens``, in whole blocks as the cache holds
    them (the context is rounded up to a multiple of ``block_tokens``).

    >>> from offload.planning.model_shapes import MODELS
    >>> g = kv_cache_group_for(MODELS["qwen2.5-7b"], 131072)
    >>> g.name, g.nbytes / 2**30
    ('kv_cache', 7.0)
    """
    config = config or DecodeConfig()
    _checked_tokens(context_tokens, batch)
    blocks = -(-context_tokens // config.block_tokens)
    return kv_cache_group(
        shape.layers,
        shape.kv_heads,
        shape.head_dim,
        blocks * config.block_tokens,
        batch,
        config.dtype_nbytes,
    )


def decode_traffic(
    shape: ModelShape,
    context_tokens: int,
    batch: int,
    placement: Placement,
    config: DecodeConfig | None = None,
) -> tuple[Traffic, int, int, int]:
    """One decode step's bytes per node (h2d, d2h), its H2D and D2H copy counts, and the layers
    streamed back. See the module docstring for what moves.

    >>> from allocators.placement import interleave
    >>> from offload.planning.model_shapes import MODELS
    >>> t, h2d_copies, d2h_copies, layers = decode_traffic(MODELS["llama-1.1b"], 4096, 1,
    ...                                                    interleave([0, 1]))
    >>> t.h2d[1] / 2**20, h2d_copies, d2h_copies, layers
    (44.0, 88, 22, 22)
    """
    config = config or DecodeConfig()
    _checked_tokens(context_tokens, batch)
    block = block_nbytes(shape, batch, config)
    blocks_per_layer = -(-context_tokens // config.block_tokens)
    resident = max(0, config.hbm_layers - 2)
    streamed = shape.layers - resident if config.hbm_layers < shape.layers else 0
    traffic = Traffic()
    if streamed:
        traffic.add("h2d", float(streamed * blocks_per_layer * block), placement)
    traffic.add("d2h", float(shape.layers * block), placement)
    return traffic, streamed * blocks_per_layer, shape.layers, streamed


def simulate_decode(
    shape: ModelShape,
    context_tokens: int,
    batch: int,
    placement: Placement,
    rates: SimRates,
    config: DecodeConfig | None = None,
) -> DecodePrediction:
    """Predict one decode step's DMA time at ``context_tokens`` with the KV cache on ``placement``.

    >>> from allocators.placement import as_placement, interleave
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import paper_rates
    >>> shape, rates = MODELS["qwen2.5-7b"], paper_rates(1)
    >>> dram = simulate_decode(shape, 131072, 1, as_placement(0), rates)
    >>> cxl = simulate_decode(shape, 131072, 1, as_placement(1), rates)
    >>> mixed = simulate_decode(shape, 131072, 1, interleave([0, 1]), rates)
    >>> dram.bottleneck, cxl.bottleneck, mixed.bottleneck
    ('link h2d', 'node 1', 'link h2d')
    >>> round(dram.tokens_per_s, 2), round(cxl.tokens_per_s, 2)
    (6.46, 6.18)
    """
    config = config or DecodeConfig()
    traffic, h2d_copies, d2h_copies, streamed = decode_traffic(
        shape, context_tokens, batch, placement, config
    )
    memory = memory_seconds(traffic, rates)
    return DecodePrediction(
        context_tokens=context_tokens,
        batch=batch,
        h2d_nbytes=round(sum(traffic.h2d.values())),
        d2h_nbytes=round(sum(traffic.d2h.values())),
        h2d_copies=h2d_copies,
        d2h_copies=d2h_copies,
        streamed_layers=streamed,
        dma_s=memory.seconds,
        latency_s=rates.copy_latency_s * max(h2d_copies, d2h_copies),
        bottleneck=memory.bottleneck,
    )
