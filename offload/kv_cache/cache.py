"""TieredKVCache: a transformers Cache whose KV blocks live in placed host tiers and stream back to
the device layer by layer, the next layer prefetched on a side stream. It must not pick placements:
they come from the allocator's plan, the caller, or (``for_model``) offload.planning.planner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import transformers
from transformers.cache_utils import Cache

from allocators.placement import Placement, as_placement
from allocators.policies import BudgetSpec
from allocators.tiered import DEFAULT_BUDGETS, TieredAllocator
from allocators.topology import Topology
from allocators.topology_command import load_topology
from offload.kv_cache.layer import ON_FULL_CHOICES, BlockPlacer, OnFull, TieredKVLayer
from offload.planning.model_shapes import ModelShape, load_model_shape, shape_from_config
from offload.planning.planner import DecodePlan, plan_decode
from offload.planning.simulator.decode import DecodeConfig
from offload.planning.simulator.rates import SimRates, sim_rates
from offload.runtime.host_memory import HostMemory
from offload.runtime.streams import CopyEvent, CopyStreams

# Built against the per-layer Cache of transformers 5.x (CacheLayerMixin, Cache(layers=...));
# tested with 5.24 (CPU) and written for 5.17 (the GPU machine's version in MEASURED.md).
SUPPORTED_TRANSFORMERS = (5, 6)


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Raise RuntimeError unless ``version`` is a transformers 5.x this cache was built for.

    >>> check_transformers_version("5.24.0")
    >>> check_transformers_version("4.46.0")
    Traceback (most recent call last):
    ...
    RuntimeError: TieredKVCache needs transformers 5.x (per-layer Cache API); found 4.46.0. Install...
    """
    major = int(version.split(".")[0])
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= major < high:
        raise RuntimeError(
            f"TieredKVCache needs transformers {low}.x (per-layer Cache API); found {version}. "
            f"Install it with: pip install 'transformers>={low},<{high}'"
        )


@dataclass
class _Slot:
    """A device buffer holding one layer's blocks, [n_blocks, 2, B, H, block_tokens, D]."""

    data: torch.Tensor | None = None
    layer_idx: int | None = None
    ready: CopyEvent | None = None
    last_use: int = 0
    prefetched: bool = False


@dataclass(frozen=True)
class KVCacheStats:
    """What the cache holds and moved: host bytes per tier, device bytes, loads and copies."""

    stored_tokens: int
    host_nbytes_by_tier: dict[str, int]
    device_nbytes: int
    prefetched_loads: int
    blocking_loads: int
    h2d_nbytes: int
    d2h_nbytes: int


class TieredKVCache(Cache):
    """A transformers Cache whose K/V live in fixed-size token blocks in placed host memory.

    Each layer's tokens go into host blocks of ``block_tokens`` tokens (tensor class
    ``kv_cache``, placed by the allocator's plan or by ``placement``); growing the context adds
    blocks and never copies the past. ``hbm_layers`` device slots hold layers: with fewer slots
    than layers, the first ``hbm_layers - 2`` layers stay resident and the other layers rotate
    through two slots (a least-recently-used window over a cyclic pass would bring every layer
    back every token); while layer i computes, the next layer not on the device is copied in on
    the H2D stream. New tokens are written into the slot and copied out on the D2H stream. On
    CPU the same calls run synchronously and "HBM" is ordinary memory.

    Args:
        memory: a HostMemory or TieredAllocator; its budgets bound the cache per tier. The
            cache releases only its own blocks.
        device: where attention runs (default: CUDA if available, else CPU).
        hbm_layers: device slots (>= 1); 2 overlaps the next layer's copy with this layer,
            each slot beyond 2 keeps one more layer resident (one layer fewer to copy per token).
        block_tokens: tokens per host block and layer (bigger blocks: fewer, larger copies).
        placement: overrides the plan's kv_cache placement, e.g. ``[(0, 0.5), (2, 0.5)]``.
            Without it the allocator's plan for class ``kv_cache`` is used (local DRAM when it
            has none); :meth:`for_model` makes an allocator whose plan has one. Whole blocks are
            spread over the placement's nodes so the bytes per node follow its shares.
        on_full: "error" raises BudgetExceededError naming tier, budget and request when a
            block fits on none of the placement's nodes; "spill" then tries each budgeted node,
            DRAM first, then remote DRAM, then CXL.

    >>> from allocators.topology import NumaNode, Topology
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> mem = HostMemory(topo, {"dram": "64MiB"}, pin=False)
    >>> with TieredKVCache(mem, device="cpu", block_tokens=4) as cache:
    ...     k, v = cache.update(torch.ones(1, 2, 6, 8), torch.ones(1, 2, 6, 8), 0)
    ...     k.shape, cache.get_seq_length(), len(cache.layers[0].blocks)
    (torch.Size([1, 2, 6, 8]), 6, 2)
    """

    def __init__(
        self,
        memory: HostMemory | TieredAllocator,
        *,
        device: torch.device | str | None = None,
        hbm_layers: int = 2,
        block_tokens: int = 1024,
        placement: Placement | int | list[tuple[int, float]] | None = None,
        on_full: OnFull = "error",
    ) -> None:
        check_transformers_version()
        super().__init__(layers=[])
        self.allocator = memory.allocator if isinstance(memory, HostMemory) else memory
        if not isinstance(self.allocator, TieredAllocator):
            raise TypeError(
                f"memory = {type(memory).__name__} is not a HostMemory or TieredAllocator; "
                "write TieredKVCache(HostMemory(discover(), {'dram': '64GiB'}))"
            )
        for name, value in (("hbm_layers", hbm_layers), ("block_tokens", block_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be a positive int, e.g. {name}=2")
        if on_full not in ON_FULL_CHOICES:
            raise ValueError(f"on_full = {on_full!r} is not one of {ON_FULL_CHOICES}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Key states arrive as cuda:N; compare like with like.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.hbm_layers = hbm_layers
        self.block_tokens = block_tokens
        self.on_full = on_full
        self.placement = (
            as_placement(placement)
            if placement is not None
            else self.allocator.placements.get("kv_cache", as_placement(self.allocator.local_node))
        )
        self._placer = BlockPlacer(self.placement)
        # Set by for_model: the plan behind the placement, and the allocator this cache made.
        self.plan: DecodePlan | None = None
        self._own_allocator: TieredAllocator | None = None
        self.streams = CopyStreams(self.device)
        self._slots = [_Slot() for _ in range(hbm_layers)]
        # The latest D2H: a slot may be refilled, and a layer's blocks read back, only after it.
        self._last_d2h: CopyEvent | None = None
        # All layers are known once layer 0 comes round again; only then does prefetch wrap.
        self._layers_complete = False
        self._uses = 0
        self._prefetched_loads = 0
        self._blocking_loads = 0
        self._h2d_nbytes = 0
        self._d2h_nbytes = 0
        self._closed = False

    @classmethod
    def for_model(
        cls,
        model_config: object,
        *,
        max_context_tokens: int,
        batch: int = 1,
        policy: str = "planned",
        topology: Topology | str | None = None,
        budgets: BudgetSpec | None = None,
        rates: SimRates | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        hbm_layers: int = 2,
        block_tokens: int = 1024,
        on_full: OnFull = "error",
        pin: bool | None = None,
    ) -> TieredKVCache:
        """A cache for ``model_config`` up to ``max_context_tokens``, placed by ``policy``.

        The KV cache of that context (K and V of every layer, ``dtype``, in whole blocks) is
        placed by offload.planning.planner.plan_decode with ``policy`` (``planned``, ``cxl_aware``,
        ``naive_interleave`` or ``local_only``) within ``budgets`` (default
        allocators.tiered.DEFAULT_BUDGETS) on ``topology`` (a Topology, a declared file or
        shipped name such as ``"paper-1aic"``, or None for this machine); ``rates`` default to
        the topology's. The cache gets its own TieredAllocator with that plan, closed with it;
        ``cache.plan`` holds the placement and the predicted decode step. Longer contexts still
        grow the cache while the budgets allow. Raises BudgetExceededError with the bytes and
        budgets when the context does not fit.

        ``model_config``: a transformers config (``model.config``), its dict, a ModelShape, or
        a name in offload.planning.model_shapes.MODELS. Other arguments are as for the constructor.

        >>> cache = TieredKVCache.for_model("qwen2.5-7b", max_context_tokens=131072,
        ...     topology="paper-1aic", budgets={"dram": "2GiB", "cxl": "64GiB"}, device="cpu",
        ...     pin=False)
        >>> print(cache.placement)
        node0:0.286 + node1:0.714
        >>> round(cache.plan.prediction.tokens_per_s, 2)
        6.46
        >>> cache.close()
        """
        shape = _model_shape(model_config)
        topo = topology if isinstance(topology, Topology) else load_topology(file=topology)
        budget_spec = dict(budgets) if budgets is not None else dict(DEFAULT_BUDGETS)
        config = DecodeConfig(
            hbm_layers=hbm_layers,
            block_tokens=block_tokens,
            dtype_nbytes=torch.empty((), dtype=dtype).element_size(),
        )
        plan = plan_decode(
            shape,
            topo.tiers,
            budget_spec,
            policy,
            context_tokens=max_context_tokens,
            batch=batch,
            rates=rates or sim_rates(topo),
            config=config,
        )
        allocator = TieredAllocator(
            topo,
            budget_spec,
            placements={"kv_cache": plan.placement},
            pin=torch.cuda.is_available() if pin is None else pin,
        )
        try:
            cache = cls(
                allocator,
                device=device,
                hbm_layers=hbm_layers,
                block_tokens=block_tokens,
                on_full=on_full,
            )
        except BaseException:
            allocator.close()
            raise
        cache.plan = plan
        cache._own_allocator = allocator
        return cache

    # -- the Cache interface ------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V of ``layer_idx`` and return all of its K/V on the device.

        Example: see the class docstring.
        """
        if self._closed:
            raise RuntimeError("this TieredKVCache was closed; make a new one")
        if key_states.device != self.device:
            raise ValueError(
                f"key_states are on {key_states.device} but the cache was made for {self.device}; "
                f"write TieredKVCache(..., device='{key_states.device}')"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(
                TieredKVLayer(
                    self.allocator,
                    self._placer,
                    self.block_tokens,
                    self.on_full,
                    len(self.layers),
                )
            )
        if layer_idx == 0 and self.layers[0].length > 0:
            self._layers_complete = True
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        slot = self._load(layer_idx)
        self._prefetch(self._prefetch_target(layer_idx), current=slot)
        return self._append(layer, slot, key_states, value_states)

    def reset(self) -> None:
        """Drop every token (blocks go back to the pool); the cache can be filled again."""
        self._drain()
        super().reset()
        self._forget_slots()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every layer."""
        self._drain()
        super().crop(tokens_to_remove)
        self._forget_slots()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (in the host blocks; device slots are refilled)."""
        self._drain()
        super().reorder_cache(beam_idx)
        self._forget_slots()

    # -- accounting and lifetime --------------------------------------------------------------

    def tier_nbytes(self) -> dict[str, int]:
        """Host bytes charged per tier for this cache's blocks, e.g. ``{"dram": 1048576}``."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for tier, n in layer.tier_nbytes().items():
                out[tier] = out.get(tier, 0) + n
        return out

    def device_nbytes(self) -> int:
        """Bytes of the device slots (the HBM window), not counting the K/V handed out."""
        return sum(
            s.data.numel() * s.data.element_size() for s in self._slots if s.data is not None
        )

    def stats(self) -> KVCacheStats:
        """Tokens stored, bytes per tier, device bytes, loads and bytes copied so far."""
        self._collect()
        return KVCacheStats(
            stored_tokens=self.get_seq_length(),
            host_nbytes_by_tier=self.tier_nbytes(),
            device_nbytes=self.device_nbytes(),
            prefetched_loads=self._prefetched_loads,
            blocking_loads=self._blocking_loads,
            h2d_nbytes=self._h2d_nbytes,
            d2h_nbytes=self._d2h_nbytes,
        )

    def close(self) -> None:
        """Wait for copies in flight, then give every block and device slot back (idempotent)."""
        if self._closed:
            return
        self._drain()
        self._collect()
        self._forget_slots()
        for slot in self._slots:
            slot.data = None
        for layer in self.layers:
            layer.release_blocks_from(0)
            layer.length = 0
        self._closed = True
        if self._own_allocator is not None:
            self._own_allocator.close()

    def __enter__(self) -> TieredKVCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- data movement ------------------------------------------------------------------------

    def _holding(self, layer_idx: int) -> _Slot | None:
        return next((slot for slot in self._slots if slot.layer_idx == layer_idx), None)

    def _resident(self, slot: _Slot) -> bool:
        """Whether ``slot`` holds one of the layers that stay on the device (the first
        ``hbm_layers - 2``): evicting them would only bring them back next token."""
        return slot.layer_idx is not None and slot.layer_idx < self.hbm_layers - 2

    def _victim(self, keep: _Slot | None) -> _Slot:
        """The slot to refill: empty first, then the least recently used one that is neither
        ``keep`` (this layer's), nor resident, nor prefetched and waiting for its layer. Its
        layer ran before, so its attention is already queued ahead of the copy.
        """
        movable = [s for s in self._slots if s is not keep and not self._resident(s)]
        candidates = [s for s in movable if not s.prefetched]
        candidates = candidates or movable or [s for s in self._slots if s is not keep]
        return min(candidates or self._slots, key=lambda s: (s.layer_idx is not None, s.last_use))

    def _prefetch_target(self, layer_idx: int) -> int | None:
        # The next layer in decode order that is not on the device; its copy overlaps this
        # layer's compute. It wraps to layer 0 only once every layer is known.
        if self.hbm_layers < 2:
            return None
        n_layers = len(self.layers)
        for ahead in range(1, n_layers):
            target = layer_idx + ahead
            if target >= n_layers:
                if not self._layers_complete:
                    return None
                target %= n_layers
            if self._holding(target) is None:
                return target
        return None

    def _prefetch(self, layer_idx: int | None, current: _Slot) -> None:
        if layer_idx is None or self._holding(layer_idx) is not None:
            return
        # Only into a slot whose layer has run: evicting a prefetched layer not yet used (or a
        # resident one) would make the copy come back before it is needed.
        if not any(
            s is not current and not self._resident(s) and not s.prefetched for s in self._slots
        ):
            return
        slot = self._victim(keep=current)
        self._fill(slot, layer_idx)
        slot.prefetched = True
        self._prefetched_loads += 1

    def _load(self, layer_idx: int) -> _Slot:
        """The slot holding ``layer_idx``'s stored tokens, ready for the compute stream."""
        slot = self._holding(layer_idx)
        if slot is None:
            slot = self._victim(keep=None)
            self._fill(slot, layer_idx)
            self._blocking_loads += 1
        if slot.ready is not None:
            self.streams.wait(slot.ready)
        self._uses += 1
        slot.last_use = self._uses
        slot.prefetched = False
        return slot

    def _fill(self, slot: _Slot, layer_idx: int) -> None:
        """Copy the stored blocks of ``layer_idx`` into ``slot`` on the H2D stream."""
        layer = self.layers[layer_idx]
        n_blocks = layer.n_blocks_for(layer.length)
        self._reserve(slot, layer, n_blocks + 1, keep_blocks=0)
        slot.layer_idx = layer_idx
        # Until a copy is queued, the slot may still be read by the last D2H.
        slot.ready = self._last_d2h
        for index in range(n_blocks):
            block = layer.blocks[index]
            slot.ready = self.streams.h2d(
                block.view,
                slot.data[index],
                after=self._last_d2h if index == 0 else None,
                # The stream runs in order: only the first copy needs to wait for compute.
                wait_compute=index == 0,
                tiers=block.tier_shares,
            )

    def _reserve(self, slot: _Slot, layer: TieredKVLayer, n_blocks: int, keep_blocks: int) -> None:
        """Make ``slot`` hold at least ``n_blocks`` blocks of ``layer``'s shape, keeping the first
        ``keep_blocks`` (a device copy on the compute stream: device memory, never the host past).
        """
        shape = (n_blocks, *layer.block_shape)
        data = slot.data
        if (
            data is not None
            and data.dtype == layer.dtype
            and data.shape[1:] == shape[1:]
            and data.shape[0] >= n_blocks
        ):
            return
        grown = torch.empty(shape, dtype=layer.dtype, device=self.device)
        if keep_blocks and data is not None:
            grown[:keep_blocks].copy_(data[:keep_blocks])
        slot.data = grown

    def _append(
        self, layer: TieredKVLayer, slot: _Slot, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, count = layer.length, keys.shape[-2]
        end = start + count
        if (keys.shape[0], keys.shape[1], keys.shape[3]) != tuple(
            layer.block_shape[i] for i in (1, 2, 4)
        ):
            raise ValueError(
                f"layer {layer.layer_idx} got keys of shape {tuple(keys.shape)}; the cache holds "
                f"blocks of {layer.block_shape} (batch, kv_heads, head_dim fixed at the first "
                "update); make a new TieredKVCache for a new batch"
            )
        n_stored = layer.n_blocks_for(start)
        # One spare block, so decoding does not regrow the slot at every block boundary.
        self._reserve(slot, layer, layer.n_blocks_for(end) + 1, keep_blocks=n_stored)
        layer.ensure_blocks(end)
        bt = self.block_tokens
        first, last = start // bt, (end - 1) // bt
        for index in range(first, last + 1):
            lo, hi = max(start, index * bt), min(end, (index + 1) * bt)
            dst = slot.data[index, :, :, :, lo - index * bt : hi - index * bt]
            dst[0].copy_(keys[:, :, lo - start : hi - start])
            dst[1].copy_(values[:, :, lo - start : hi - start])
        for index in range(first, last + 1):
            block = layer.blocks[index]
            self._last_d2h = self.streams.d2h(slot.data[index], block.view, block.tier_shares)
        layer.length = end
        n_blocks = last + 1
        # [n, 2, B, H, bt, D] -> [2, B, H, n * bt, D]: one device gather for K and V together.
        gathered = (
            slot.data[:n_blocks]
            .permute(1, 2, 3, 0, 4, 5)
            .reshape(2, *layer.block_shape[1:3], n_blocks * bt, layer.block_shape[4])
        )
        return gathered[0, :, :, :end], gathered[1, :, :, :end]

    def _collect(self) -> None:
        # Only stats() and close() collect: collecting waits for every copy in flight, and the
        # streams bound their pending timing events themselves however long the decode runs.
        done = self.streams.collect()
        self._h2d_nbytes += done.h2d_nbytes
        self._d2h_nbytes += done.d2h_nbytes

    def _drain(self) -> None:
        """Block the host until every copy is done: host blocks complete and no longer read."""
        pending = [self._last_d2h, *(slot.ready for slot in self._slots)]
        for event in pending:
            if event is not None:
                self.streams.host_wait(event)

    def _forget_slots(self) -> None:
        for slot in self._slots:
            slot.layer_idx = None
            slot.ready = None
            slot.prefetched = False


def _model_shape(model_config: object) -> ModelShape:
    """A ModelShape from a transformers config, its dict, a ModelShape or a known model name."""
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, str):
        return load_model_shape(model_config)
    if isinstance(model_config, Mapping):
        return shape_from_config(dict(model_config))
    to_dict = getattr(model_config, "to_dict", None)
    if callable(to_dict):
        return shape_from_config(to_dict(), name=type(model_config).__name__)
    raise TypeError(
        f"model_config = {type(model_config).__name__} is not a model config; pass model.config, "
        "its to_dict(), an offload.planning.model_shapes.ModelShape or a name such as 'qwen2.5-7b'"
    )
