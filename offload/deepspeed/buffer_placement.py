"""While active, upstream DeepSpeed's ZeRO offload host buffers come from our TieredAllocator, by
tensor class. It hooks deepspeed.initialize and the attached engine's calls; it must not plan or
change DeepSpeed's math.

Supported: deepspeed 0.19.x (see offload.deepspeed.call_sites). Three narrow hooks: DeepSpeed's
pinned-memory backend lookup (offload.deepspeed.pin_hook; every ``get_accelerator().pin_memory``
goes through it), so pinned fp32 master partitions, gradient and parameter buffers are ours, both
inside ``deepspeed.initialize`` and, once :meth:`DeepSpeedPlacement.attach` ed, inside the engine's
forward, backward and step (ZeRO-2's per-parameter gradient accumulation buffers are made there);
ZeRO-3's unpinned fp32 master partitions, moved into ours right after ``_create_fp32_partitions``
makes them; and the CPU Adam moments, made in ours by :meth:`DeepSpeedPlacement.
adopt_optimizer_states`. Pins asked for by user code or by other engines are never routed.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from allocators.tiered import Allocation, TieredAllocator
from allocators.units import format_bytes
from offload.deepspeed import pin_hook
from offload.deepspeed.call_sites import check_version, classify
from offload.deepspeed.release import disarm_output_hooks, note_output_hooks

# The engine calls inside which DeepSpeed may pin more host memory after initialize, and destroy,
# whose unpin of our buffers must reach us (we release them; DeepSpeed's backend must not).
ENGINE_CALLS = ("forward", "backward", "step", "destroy")


class BuffersInUseWarning(UserWarning):
    """close() left host buffers mapped because tensors still view them (they are not unmapped
    under a live tensor); the message says how many and what still holds them."""


@dataclass(frozen=True)
class PlacedBuffer:
    """One DeepSpeed host buffer we made: where DeepSpeed asked for it, its class and bytes."""

    site: str
    tensor_class: str
    nbytes: int
    allocation: Allocation = field(repr=False)


@dataclass(frozen=True)
class UnplacedBuffer:
    """A host buffer DeepSpeed asked for through the hook but got the stock way, and why.

    ``tensor_class`` is ``"unknown"`` where the call site is not one this plugin knows.
    """

    site: str
    tensor_class: str
    nbytes: int
    why: str


_STATE_SITE = "optimizer.state"


def _master_partitions(zero_optimizer: Any, inner: Any) -> list[torch.Tensor]:
    """The fp32 partitions the CPU optimizer steps: ZeRO-3 swaps them in and out of its param
    groups one sub-group at a time, so they are read from the ZeRO optimizer, not the groups."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        partitions = getattr(zero_optimizer, name, None)
        if partitions is not None:
            return list(partitions)
    return [p for group in inner.param_groups for p in group["params"]]


def _caller_label(frame: FrameType | None) -> str:
    while frame is not None and "deepspeed" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "outside deepspeed"
    return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"


class DeepSpeedPlacement:
    """Route ZeRO offload host buffers to ``allocator`` while used as a context manager around
    ``deepspeed.initialize``, and inside the engine's calls once :meth:`attach` ed.

    Buffers stay ours after exit (DeepSpeed keeps using them); :meth:`close` gives them back once
    the engine is gone. Pins DeepSpeed asks for from a place we do not know go the stock way and
    are listed in ``unplaced`` (with their bytes), so nothing is silently misfiled.

    >>> from allocators.topology import NumaNode, Topology
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> placement = DeepSpeedPlacement(TieredAllocator(topo, {"dram": "1GiB"}, pin=False))
    >>> with placement:  # doctest: +SKIP
    ...     engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config)
    >>> placement.adopt_optimizer_states(engine.optimizer)  # doctest: +SKIP
    >>> placement.attach(engine)  # doctest: +SKIP
    >>> placement.close()
    """

    def __init__(self, allocator: TieredAllocator) -> None:
        self.allocator = allocator
        self.placed: list[PlacedBuffer] = []
        self.unplaced: list[UnplacedBuffer] = []
        self._undo: list[tuple[Any, str, Any]] = []
        self._routing: Any = None
        self._engine: weakref.ref | None = None
        self._output_hooks: weakref.WeakSet = weakref.WeakSet()

    def __enter__(self) -> DeepSpeedPlacement:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        check_version(deepspeed.__version__)
        if self._routing is not None:
            raise RuntimeError("this DeepSpeedPlacement is already active; do not nest it")
        stock_create = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions

        def create_fp32_partitions(optimizer: Any) -> None:
            stock_create(optimizer)
            self._adopt_stage3_fp32(optimizer)

        self._swap(DeepSpeedZeroOptimizer_Stage3, "_create_fp32_partitions", create_fp32_partitions)
        pin_hook.install()
        self._routing = pin_hook.routing(self)
        self._routing.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._routing is not None:
            self._routing.__exit__(None, None, None)
            self._routing = None
            pin_hook.uninstall()
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)

    def _swap(self, owner: Any, name: str, replacement: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def attach(self, engine: Any) -> None:
        """Route the pins of ``engine``'s forward, backward, step (and the unpins of its destroy)
        to us until :meth:`close`.

        DeepSpeed pins more host memory after initialize (ZeRO-2 offload with gradient
        accumulation makes one gradient buffer per parameter in its first backward); only pins
        made inside these calls of this engine are routed, so user code and other engines keep
        DeepSpeed's own pinning.
        """
        if self._engine is not None:
            raise RuntimeError("this DeepSpeedPlacement is attached to an engine already")
        pin_hook.install()
        for name in ENGINE_CALLS:
            if hasattr(engine, name):
                setattr(engine, name, pin_hook.routed(getattr(engine, name), self))
        routed_forward = engine.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            # The engine hangs a hook manager (holding itself) on each output; close() disarms
            # the ones a caller still holds (its last loss), or they would keep the engine.
            outputs = routed_forward(*args, **kwargs)
            note_output_hooks(outputs, self._output_hooks)
            return outputs

        engine.forward = forward
        self._engine = weakref.ref(engine)

    def detach(self) -> None:
        """Stop routing the attached engine's pins (its own methods are put back); idempotent."""
        if self._engine is None:
            return
        engine = self._engine()
        if engine is not None:
            for name in ENGINE_CALLS:
                if name in vars(engine):
                    delattr(engine, name)
        self._engine = None
        pin_hook.uninstall()

    def _new(self, site: str, tensor_class: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        allocation = self.allocator.allocate(tensor_class, nbytes)
        self.placed.append(PlacedBuffer(site, tensor_class, nbytes, allocation))
        return allocation.tensor(dtype, tuple(shape))

    def _place_for_caller(
        self, frame: FrameType | None, dtype: torch.dtype, shape: tuple, device: torch.device
    ) -> torch.Tensor | None:
        """Our tensor for the ZeRO call site that asked, or None (noted) to leave it to DeepSpeed."""
        site = classify(frame)
        why = ""
        if site is None:
            why = "not a deepspeed 0.19 call site this plugin knows"
        elif device.type != "cpu":
            why = f"a {device.type} tensor, not host memory"
        elif torch.Size(shape).numel() == 0:
            why = "empty"
        if site is None or why:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            label = _caller_label(frame) if site is None else f"{site.file}:{site.function}"
            tensor_class = "unknown" if site is None else site.tensor_class
            if nbytes:
                self.unplaced.append(UnplacedBuffer(label, tensor_class, nbytes, why))
            return None
        label = f"{site.file}:{site.function}:{site.token}"
        return self._new(label, site.tensor_class, dtype, tuple(shape))

    # DeepSpeed's pinned-memory backend interface (pin, pin_empty, is_pinned, unpin).
    def pin(self, tensor: torch.Tensor, make_copy: bool = True, match_shape: bool = True):
        """DeepSpeed's pin: a copy of ``tensor`` in our memory, classed by who asked."""
        from deepspeed.accelerator import get_accelerator

        shape = tuple(tensor.shape) if match_shape else (tensor.numel(),)
        ours = self._place_for_caller(sys._getframe(1), tensor.dtype, shape, tensor.device)
        if ours is None:
            with pin_hook.stock():
                return get_accelerator().pin_memory(
                    tensor, make_copy=make_copy, match_shape=match_shape
                )
        if make_copy:
            ours.copy_(tensor.reshape(shape))
        return ours

    def pin_empty(self, example: torch.Tensor, shape: tuple):
        """DeepSpeed's empty pinned tensor of ``example``'s dtype, classed by who asked."""
        from deepspeed.accelerator import get_accelerator

        ours = self._place_for_caller(sys._getframe(1), example.dtype, tuple(shape), example.device)
        if ours is None:
            with pin_hook.stock():
                return get_accelerator()._pin_fresh(example, shape)
        return ours

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """True for our buffers when CUDA pinned them, else what DeepSpeed would say."""
        from deepspeed.accelerator import get_accelerator

        if self._owns(tensor):
            return self.allocator.pin
        with pin_hook.stock():
            return bool(get_accelerator().is_pinned(tensor))

    def unpin(self, tensor: torch.Tensor) -> Any:
        """Our buffers are released by :meth:`close`, not by DeepSpeed; others go the stock way."""
        from deepspeed.accelerator import get_accelerator

        if self._owns(tensor):
            return None
        with pin_hook.stock():
            return get_accelerator().unpin_memory(tensor)

    def _owns(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu":
            return False
        ptr = tensor.data_ptr()
        return any(
            p.allocation.buffer.ptr <= ptr < p.allocation.buffer.ptr + p.allocation.buffer.nbytes
            for p in self.placed
            if not p.allocation.released
        )

    def _adopt_stage3_fp32(self, optimizer: Any) -> None:
        """Move ZeRO-3's fresh CPU fp32 master partitions into ours before anything views them."""
        for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat):
            fp16 = optimizer.fp16_partitioned_groups_flat[i]
            shared = fp16 is not None and fp16.numel() and fp16.data_ptr() == flat.data_ptr()
            if flat.device.type != "cpu" or flat.numel() == 0 or shared:
                continue
            ours = self._new(
                "stage3.py:_create_fp32_partitions", "master_params", flat.dtype, tuple(flat.shape)
            )
            ours.copy_(flat)
            flat.data = ours

    def adopt_optimizer_states(self, zero_optimizer: Any) -> int:
        """Put the CPU optimizer's moments in our memory (class ``optimizer_state``); returns bytes.

        DeepSpeedCPUAdam makes its state at its first step; we make it first, exactly as it would
        (step 0, zeroed moments). State an optimizer already has is copied into ours. Other
        optimizers' lazy state is left to them and noted in ``unplaced`` (call this again after
        their first step). Call it after deepspeed.initialize, before the first step.
        """
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
        placed_nbytes = 0
        for param in _master_partitions(zero_optimizer, inner):
            if param.device.type != "cpu":
                continue
            state = inner.state[param]
            if not state and isinstance(inner, DeepSpeedCPUAdam):
                dtype = torch.float if inner.fp32_optimizer_states else param.dtype
                state["step"] = 0
                state["exp_avg"] = self._new(
                    _STATE_SITE, "optimizer_state", dtype, param.shape
                ).zero_()
                state["exp_avg_sq"] = self._new(
                    _STATE_SITE, "optimizer_state", dtype, param.shape
                ).zero_()
            elif not state:
                self.unplaced.append(
                    UnplacedBuffer(
                        f"{type(inner).__name__}.state",
                        "optimizer_state",
                        0,
                        f"made lazily at its first step for {tuple(param.shape)}; call "
                        "adopt_optimizer_states again after it",
                    )
                )
            for key, value in list(state.items()):
                if not torch.is_tensor(value) or value.shape != param.shape:
                    continue
                if not self._owns(value):
                    state[key] = self._new(_STATE_SITE, "optimizer_state", value.dtype, value.shape)
                    state[key].copy_(value)
                placed_nbytes += value.numel() * value.element_size()
        return placed_nbytes

    def nbytes_by_class(self) -> dict[str, int]:
        """Bytes we placed for DeepSpeed per tensor class (live buffers only).

        >>> from allocators.topology import NumaNode, Topology
        >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
        >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
        >>> placement = DeepSpeedPlacement(TieredAllocator(topo, {"dram": "1GiB"}, pin=False))
        >>> moment = placement._new("example", "optimizer_state", torch.float32, (1024,))
        >>> placement.nbytes_by_class()
        {'optimizer_state': 4096}
        >>> del moment; placement.close(); placement.nbytes_by_class()
        {}
        """
        totals: dict[str, int] = {}
        for p in self.placed:
            if not p.allocation.released:
                totals[p.tensor_class] = totals.get(p.tensor_class, 0) + p.nbytes
        return totals

    def unplaced_nbytes_by_class(self) -> dict[str, int]:
        """Bytes DeepSpeed pinned through the hook the stock way, per class (``unknown`` site).

        >>> from allocators.topology import NumaNode, Topology
        >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
        >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
        >>> placement = DeepSpeedPlacement(TieredAllocator(topo, {"dram": "1GiB"}, pin=False))
        >>> placement._place_for_caller(None, torch.float32, (256,), torch.device("cpu"))
        >>> placement.unplaced_nbytes_by_class()
        {'unknown': 1024}
        """
        totals: dict[str, int] = {}
        for buffer in self.unplaced:
            totals[buffer.tensor_class] = totals.get(buffer.tensor_class, 0) + buffer.nbytes
        return {cls: n for cls, n in totals.items() if n}

    def close(self) -> None:
        """Stop routing, then give back every buffer no tensor views any more; warn about the rest.

        The engine must be destroyed and dropped first (``DeepSpeedRun.close`` does both). A
        buffer still viewed (the caller kept the engine, its optimizer or a tensor of it) is not
        unmapped, which would crash whoever reads it: it stays mapped and charged, a
        BuffersInUseWarning counts them, and calling close() again once they are dropped (or
        process exit) frees them.
        """
        self.__exit__(None, None, None)
        self.detach()
        disarm_output_hooks(self._output_hooks)
        gc.collect()
        try:
            self.allocator.close()
        except BufferError:
            busy = [p for p in self.placed if not p.allocation.released]
            views = sum(getattr(p.allocation.buffer, "live_views", 0) for p in busy)
            by_class: dict[str, int] = {}
            for p in busy:
                by_class[p.tensor_class] = by_class.get(p.tensor_class, 0) + p.nbytes
            listed = ", ".join(f"{cls} {format_bytes(n)}" for cls, n in sorted(by_class.items()))
            warnings.warn(
                f"{len(busy)} of {len(self.placed)} DeepSpeed host buffers ({listed}) still have "
                f"{views} live tensor view(s), so they stay mapped and charged: something still "
                "holds the engine, its optimizer or a tensor of theirs (under ZeRO-3, the model "
                "itself, whose parameters are the params buffers, or the last loss, whose "
                "autograd graph holds the model). Drop those references and call close() again; "
                "otherwise they are freed when the process exits",
                BuffersInUseWarning,
                stacklevel=2,
            )
