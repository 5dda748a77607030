"""Activation offload: saved-tensor hooks move saved activations into pooled host blocks in forward
and bring them back in backward, prefetching the layer below. Parameters and buffers never move.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections import defaultdict, deque

import torch
from torch import nn

from allocators.errors import BudgetExceededError, OffloadError
from allocators.units import format_bytes
from offload.runtime.host_memory import HostBlock, HostMemory
from offload.runtime.streams import CopyEvent, CopyStreams


def find_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of repeated blocks: the nn.ModuleList holding the most parameters.

    >>> find_layers(nn.Sequential(nn.Linear(2, 2))) is None
    True
    >>> len(find_layers(nn.ModuleDict({"h": nn.ModuleList([nn.Linear(2, 2)] * 3)})))
    3
    """
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = module, count
    return best


class ForwardCalls:
    """Counts the calls of ``module.forward`` running now, by wrapping it in try/finally.

    A call cut by a KeyboardInterrupt skips the module's always-call forward hooks, but not
    this count, so a forward pre-hook can tell a call nested in a running one from a new call
    after an interrupted one. :meth:`remove` puts the module's forward back (a wrapper that
    someone else put over this one keeps it, and it then only counts).

    >>> lin = nn.Linear(2, 2)
    >>> calls = ForwardCalls(lin)
    >>> seen = []
    >>> _ = lin.register_forward_pre_hook(lambda *_: seen.append(calls.running))
    >>> _ = lin(torch.ones(2)); seen, calls.running
    ([0], 0)
    >>> calls.remove(); "forward" in vars(lin)
    False
    """

    def __init__(self, module: nn.Module) -> None:
        self.running = 0
        self._module = module
        self._own = vars(module).get("forward")
        original = module.forward
        # Wrapped as it is, a method as a method: inspect.signature(model.forward) (read by
        # transformers' Trainer) and wrappers that unwrap forward.__func__ (accelerate's
        # autocast) see what they saw before.
        bound = isinstance(original, types.MethodType) and original.__self__ is module
        inner = original.__func__ if bound else original

        @functools.wraps(inner)
        def forward(*args, **kwargs):
            self.running += 1
            try:
                return inner(*args, **kwargs)
            finally:
                self.running -= 1

        self._wrapper = types.MethodType(forward, module) if bound else forward
        module.forward = self._wrapper

    def remove(self) -> None:
        """Give the module its own forward back."""
        if vars(self._module).get("forward") is not self._wrapper:
            return
        if self._own is None:
            del self._module.forward
        else:
            self._module.forward = self._own


class SavedActivation:
    """One offloaded activation: its host copy, where it came from, and its prefetched return.

    When autograd drops it (after backward, or with the graph) its host block is queued for
    the owner's :meth:`ActivationOffloader.reap`, which gives it back to the pool once its last
    copy has finished.
    """

    def __init__(self, owner: ActivationOffloader, block: HostBlock, source: torch.Tensor, tag):
        self.owner = owner
        self.block = block
        self.host = block.tensor(source.dtype, tuple(source.shape))
        self.device = source.device
        self.tag = tag
        self.stored: CopyEvent = owner.streams.d2h(source, self.host, block.tier_shares)
        self.last_copy = self.stored
        self.prefetched: tuple[torch.Tensor, CopyEvent] | None = None
        # How many autograd nodes saved this same tensor, and how many have not unpacked it
        # yet in this backward: the device copy is shared until the last of them has it.
        self.uses = 1
        self.unpacks_left = 1

    def fetch(self) -> tuple[torch.Tensor, CopyEvent]:
        """Start the H2D copy back into a new device tensor (once) and return it with its event."""
        if self.host is None:
            raise OffloadError(
                "this saved activation was freed when its offload session was disabled (or left "
                "its `with` block) before backward ran; run the forward pass again, and call "
                "backward before disabling the session"
            )
        if self.prefetched is None:
            out = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            copy = self.owner.streams.h2d(
                self.host, out, after=self.stored, tiers=self.block.tier_shares
            )
            self.prefetched = (out, copy)
            self.last_copy = copy
        return self.prefetched

    def drop(self) -> None:
        """Queue the host block to go back to the pool, leaving this activation unusable."""
        if getattr(self, "host", None) is None:  # dropped already, or __init__ failed
            return
        # The pool takes a block back only once no view of it is left.
        self.host = None
        self.prefetched = None
        self.owner._retire(self.block, self.last_copy)

    def __del__(self) -> None:
        # Only queued: a garbage-collection pass can run this inside the allocator's own lock
        # (an allocation in _charge), where releasing the block would deadlock.
        self.drop()


class ParamCast:
    """A saved cast of a model parameter (autocast's bf16 copy of an fp32 weight): nothing is
    stored; backward casts the parameter again. Offloading it would move 2 bytes per parameter
    each way every step to save what one cast on the device rebuilds. The parameter's own
    backward reads it before the parameter's gradient is complete, so before any optimizer step
    (early or not) can change it; the version check says so loudly if that ever breaks.
    """

    __slots__ = ("param", "dtype", "device", "version", "view")

    def __init__(self, param: nn.Parameter, like: torch.Tensor) -> None:
        self.param = param
        self.dtype = like.dtype
        self.device = like.device
        self.version = param._version
        # Ops save views of the cast (linear saves weight.t()): rebuilt over a fresh cast,
        # which has the same contiguous layout as the one forward made.
        self.view = (tuple(like.shape), like.stride(), like.storage_offset())

    def value(self) -> torch.Tensor:
        """The cast again, bit-equal to the one forward saved."""
        if self.param._version != self.version:
            raise OffloadError(
                "a parameter whose cast forward saved was changed in place before backward used "
                "it; step the optimizer after backward (or pass overlap_step=False)"
            )
        with torch.no_grad():
            cast = self.param.to(device=self.device, dtype=self.dtype, copy=True)
            return cast.as_strided(*self.view)


class ActivationOffloader:
    """Saved-tensor hooks that offload activations of at least ``min_nbytes`` from ``model``.

    The hooks are active only inside ``model``'s forward (entered by forward hooks), so the user
    loop does not change. Forward hooks on each layer of ``layers`` tag saved tensors with the
    layer; in backward, the first unpack in layer ``i`` starts the H2D copy of layers
    ``i-1 .. i-prefetch_layers``.

    >>> from allocators.sysfs_topology import discover
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    >>> mem = HostMemory(discover(), {"dram": "1GiB"})
    >>> off = ActivationOffloader(model, mem, CopyStreams(torch.device("cpu")), min_nbytes=1024)
    >>> model(torch.randn(32, 64)).sum().backward()
    >>> dropped_nbytes = mem.pool_stats().in_use_nbytes; off.reap()
    >>> off.offloaded_count > 0, dropped_nbytes > 0, mem.pool_stats().in_use_nbytes
    (True, True, 0)
    >>> off.remove(); mem.close()
    """

    def __init__(
        self,
        model: nn.Module,
        memory: HostMemory,
        streams: CopyStreams,
        *,
        min_nbytes: int = 1 << 20,
        prefetch_layers: int = 1,
        layers: nn.ModuleList | None = None,
    ) -> None:
        self.model = model
        self.memory = memory
        self.streams = streams
        self.min_nbytes = min_nbytes
        self.prefetch_layers = prefetch_layers
        self.layers = layers if layers is not None else find_layers(model)
        self.offloaded_count = 0
        self.offloaded_nbytes = 0
        # Saves of a tensor already offloaded in this forward (the q, k and v projections all
        # save their common input): they share its host copy instead of making their own.
        self.shared_count = 0
        self.shared_nbytes = 0
        # Saved casts of parameters (autocast) rebuilt in backward instead of moved.
        self.recast_count = 0
        self.recast_nbytes = 0
        self._recent: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._kept_storages = self._storages_of_params_and_buffers()
        self._hooks_context: torch.autograd.graph.saved_tensors_hooks | None = None
        # The thread whose forward entered the hooks: torch keeps saved-tensor hooks per thread,
        # so only that thread may leave them. A forward in another thread (an evaluation beside
        # training) or one under no_grad saves nothing for backward and is left alone.
        self._forward_thread: int | None = None
        self._depth = 0
        self._tag = -1
        self._backward_tag: int | None = None
        self._by_tag: dict[int, list[weakref.ref]] = defaultdict(list)
        # Blocks of dropped activations and their last copy, released by reap(): appended from
        # __del__ (any thread, any moment), so a deque, whose append and popleft are atomic.
        self._retired: deque[tuple[HostBlock, CopyEvent]] = deque()
        # Activations autograd still holds: a graph kept alive by an exception's traceback (an
        # error or KeyboardInterrupt mid-step) must not keep host memory after remove().
        self._live: weakref.WeakSet[SavedActivation] = weakref.WeakSet()
        self._calls = ForwardCalls(model)
        self._handles = [
            self._calls,
            model.register_forward_pre_hook(self._enter_forward),
            model.register_forward_hook(self._exit_forward, always_call=True),
        ]
        for index, layer in enumerate(self.layers or ()):
            self._handles.append(layer.register_forward_pre_hook(self._layer_entered(index)))
        if self.layers:
            last = len(self.layers)
            self._handles.append(
                self.layers[-1].register_forward_hook(lambda *_: self._set_tag(last))
            )

    def remove(self) -> None:
        """Remove every hook and give back every host block, waiting for copies in flight.

        Activations saved and not yet used by backward are freed too (a graph that outlives
        the session, e.g. one held by the traceback of an error raised mid-step, must not pin
        host memory); using one later raises an OffloadError that says to run forward again.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._hooks_context is not None and self._forward_thread == threading.get_ident():
            # A KeyboardInterrupt in forward skips the always-call hook that would have left it.
            self._hooks_context.__exit__(None, None, None)
        self._hooks_context = None
        self._forward_thread = None
        self._depth = 0
        for saved in list(self._live):
            saved.drop()
        self._by_tag = defaultdict(list)
        self.reap(wait=True)

    def reap(self, *, wait: bool = False) -> None:
        """Give back the host blocks of dropped activations whose last copy has finished (all
        of them, after waiting for their copies, with ``wait``).

        Called at safe points, never from a finalizer: before each pack and each forward, at
        each optimizer step (the session) and at :meth:`remove`.
        """
        for _ in range(len(self._retired)):
            block, event = self._retired.popleft()
            if wait:
                event.synchronize()
            if event.query():
                self.memory.release(block)
            else:
                self._retired.append((block, event))

    def _storages_of_params_and_buffers(self) -> set[int]:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return {t.untyped_storage().data_ptr() for t in tensors}

    def _enter_forward(self, module: nn.Module, args) -> None:
        thread = threading.get_ident()
        if self._forward_thread not in (None, thread):
            return
        if self._depth == 0 and not torch.is_grad_enabled():
            return
        if self._depth > 0 and self._calls.running == 0:
            # The last forward was cut by a KeyboardInterrupt, which skips always-call hooks;
            # leaving the hooks installed would offload every autograd op of the process.
            self._exit_forward(module, args, None, ended=True)
        if self._depth == 0:
            self.reap()
            self._tag = -1
            self._backward_tag = None
            self._by_tag = defaultdict(list)
            self._recent = {}
            self._hooks_context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks_context.__enter__()
            self._forward_thread = thread
        self._depth += 1

    def _exit_forward(self, module: nn.Module, args, output, *, ended: bool = False) -> None:
        if self._forward_thread != threading.get_ident():
            return  # a forward _enter_forward left alone
        self._depth = 0 if ended else self._depth - 1
        if self._depth == 0:
            self._hooks_context.__exit__(None, None, None)
            self._hooks_context = None
            self._forward_thread = None

    def _layer_entered(self, index: int):
        return lambda module, args: self._set_tag(index)

    def _set_tag(self, tag: int) -> None:
        # Recomputation in backward (checkpointing) runs layer forwards again: leave tags alone.
        if self._depth > 0 and self._forward_thread == threading.get_ident():
            self._tag = tag

    def _should_offload(self, tensor: torch.Tensor) -> bool:
        if tensor.layout != torch.strided or tensor.device.type not in ("cuda", "cpu"):
            return False
        if tensor.device.type != self.streams.device.type:
            return False
        if tensor.numel() * tensor.element_size() < self.min_nbytes:
            return False
        return tensor.untyped_storage().data_ptr() not in self._kept_storages

    def _param_cast(self, tensor: torch.Tensor) -> ParamCast | None:
        """A ParamCast when ``tensor`` is ``param.to(dtype)`` of one of the model's parameters
        (autocast's cached weight casts) or a view of it, else None."""
        cast = tensor._base if tensor._base is not None else tensor
        fn = cast.grad_fn
        if fn is None or type(fn).__name__ != "ToCopyBackward0" or len(fn.next_functions) != 1:
            return None
        source = getattr(fn.next_functions[0][0], "variable", None)
        if not isinstance(source, torch.Tensor) or source.grad_fn is not None:
            return None
        if source.untyped_storage().data_ptr() not in self._kept_storages:
            return None
        # Only a plain contiguous cast, never written to, is rebuilt bit for bit by a new one.
        plain = cast.shape == source.shape and cast.is_contiguous() and source.is_contiguous()
        if not plain or cast.storage_offset() != 0 or cast._version != 0:
            return None
        return ParamCast(source, tensor)

    def _pack(self, tensor: torch.Tensor):
        if not self._should_offload(tensor):
            return tensor
        if self._retired:
            self.reap()
        nbytes = tensor.numel() * tensor.element_size()
        cast = self._param_cast(tensor)
        if cast is not None:
            self.recast_count += 1
            self.recast_nbytes += nbytes
            return cast
        key = (
            tensor.device,
            tensor.data_ptr(),
            tensor.dtype,
            tuple(tensor.shape),
            tensor.stride(),
            tensor._version,
        )
        shared = self._shared(key)
        if shared is not None:
            shared.uses += 1
            shared.unpacks_left += 1
            self.shared_count += 1
            self.shared_nbytes += nbytes
            return shared
        try:
            block = self.memory.allocate("activations", nbytes)
        except BudgetExceededError as exc:
            where = "before the first layer" if self._tag < 0 else f"in layer {self._tag}"
            raise BudgetExceededError(
                f"{exc}. The forward ran out of host budget for saved activations {where}: "
                f"every saved tensor of at least {format_bytes(self.min_nbytes)} goes to the "
                "host. `offload doctor --model NAME --seq N` says what each activation mode "
                "needs; pass activations='checkpoint' (only layer inputs) or loss_chunk_tokens=N "
                "(no whole fp32 log-probs), or raise the budget"
            ) from exc
        saved = SavedActivation(self, block, tensor, self._tag)
        # Only while the memory's owner lives is an equal address the same memory: a freed
        # tensor's address can be handed to a new one of the same shape. The owner is the view's
        # base when there is one: F.linear saves a fresh 2-D view of its input per call, which
        # dies as soon as the call returns, while the input itself (the norm output q, k and v
        # all read) lives on; views share their base's version counter, which the key holds.
        owner = tensor._base if tensor._base is not None else tensor
        self._recent[key] = (weakref.ref(owner), weakref.ref(saved))
        self._live.add(saved)
        self._by_tag[self._tag].append(weakref.ref(saved))
        self.offloaded_count += 1
        self.offloaded_nbytes += nbytes
        return saved

    def _shared(self, key: tuple) -> SavedActivation | None:
        entry = self._recent.get(key)
        if entry is None:
            return None
        source, saved = entry[0](), entry[1]()
        if source is None or saved is None or saved.host is None:
            del self._recent[key]
            return None
        return saved

    def _unpack(self, packed):
        if isinstance(packed, ParamCast):
            return packed.value()
        if not isinstance(packed, SavedActivation):
            return packed
        if packed.tag != self._backward_tag:
            self._backward_tag = packed.tag
            self._prefetch_below(packed.tag)
        out, event = packed.fetch()
        self.streams.wait(event)
        packed.unpacks_left -= 1
        if packed.unpacks_left <= 0:
            # retain_graph may unpack again: the next unpack starts a fresh copy.
            packed.prefetched = None
            packed.unpacks_left = packed.uses
        return out

    def _prefetch_below(self, tag: int) -> None:
        for lower in range(tag - 1, tag - 1 - self.prefetch_layers, -1):
            for ref in self._by_tag.pop(lower, ()):
                saved = ref()
                if saved is not None:
                    saved.fetch()

    def _retire(self, block: HostBlock, event: CopyEvent) -> None:
        self._retired.append((block, event))
