"""Optimizer and gradient offload: fp32 masters and optimizer state on the host, gradients copied
D2H in buckets as backward produces them, buckets stepped on the host, params copied back.

Exactness (the default gives the same result as the user's optimizer on the device):
- a bucket is stepped while backward still runs only when every parameter in it has received the
  gradient of the last micro-step of the accumulation window (``grad_accumulation_steps``) and
  no clipping by global norm is asked for; per-parameter optimizers (Adam, AdamW, Lion, SGD) do
  not depend on the order in which parameters are stepped, so this changes no value;
- with ``max_grad_norm`` every step waits for ``optimizer.step()``, where the norm of all the
  host gradients is known, and clips with the norm and coefficient of torch.nn.utils.clip_grad_norm_;
- micro-step gradients are summed on the host in the parameter's dtype, in arrival order, the
  same additions autograd would have made into ``param.grad``.
This module must not touch the user's loop: the user's optimizer object is patched in place by
offload.runtime.optimizer_patch.
"""

from __future__ import annotations

import inspect
import threading
import time
import traceback
import warnings
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from allocators.errors import OffloadError
from offload.runtime.host_memory import HostBlock, HostMemory
from offload.runtime.host_step import HostStep
from offload.runtime.streams import CopyEvent, CopyStreams
from optim_cpu.contention import ContentionPolicy


class PartialStepWarning(RuntimeWarning):
    """A step was abandoned after some buckets had been stepped early (backward failed)."""


class ForwardBeforeStepWarning(RuntimeWarning):
    """A forward ran after backward() and before optimizer.step() while buckets were stepped
    early: it read updated params where plain torch would read the old ones."""


def clip_by_global_norm(
    grads: list[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale ``grads`` in place as ``torch.nn.utils.clip_grad_norm_`` scales ``param.grad``s,
    with the same norm and the same clamped coefficient; return the total norm.

    >>> g = [torch.full((4,), 3.0)]
    >>> float(clip_by_global_norm(g, 1.0)), round(float(g[0].norm()), 4)
    (6.0, 1.0)
    """
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(coef.to(grad.device))
    return total


def refuse_unsteppable(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before anything is touched, an optimizer a bucketed host step cannot run: one
    whose ``step()`` needs a closure (L-BFGS), or one for sparse gradients (SparseAdam).

    >>> refuse_unsteppable(torch.optim.LBFGS([nn.Parameter(torch.ones(1))]))
    Traceback (most recent call last):
    ...
    allocators.errors.OffloadError: LBFGS.step() needs a closure that re-evaluates the loss ...
    """
    name = type(optimizer).__name__
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise OffloadError(
            f"{name}.step() needs a closure that re-evaluates the loss (L-BFGS calls it "
            "several times per step); optimizer offload steps each gradient once, as "
            "backward hands it over, so it cannot run it. Use a first-order optimizer "
            "such as torch.optim.AdamW, or pass optimizer_offload=False to offload.enable() "
            "(activations are still offloaded)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise OffloadError(
            "SparseAdam steps sparse gradients, and optimizer offload moves and steps dense "
            "ones; build the embedding with sparse=False and use torch.optim.AdamW, or "
            "pass optimizer_offload=False to offload.enable()"
        )


# A key of the param groups of a state dict saved under offload with half-precision params.
MASTERS_KEY = "offload_fp32_masters"


def refuse_dropped_masters(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose state was loaded, before ``offload.enable()``, from a state
    dict saved under offload for half-precision params: torch's ``load_state_dict`` dropped the
    fp32 masters and rounded the state to the params' dtype.

    >>> p = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    >>> opt = torch.optim.AdamW([p]); opt.param_groups[0][MASTERS_KEY] = True
    >>> refuse_dropped_masters(opt)
    Traceback (most recent call last):
    ...
    allocators.errors.OffloadError: optimizer.load_state_dict() ran before offload.enable() ...
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    half = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if half and any(group.get(MASTERS_KEY) for group in optimizer.param_groups):
        raise OffloadError(
            "optimizer.load_state_dict() ran before offload.enable() on a state dict saved "
            "under offload: torch's load_state_dict dropped its fp32 master params "
            f"('offload_master_params') and rounded its state to {', '.join(half)}, so the run "
            "would diverge from the one that saved it. Call offload.enable() first and "
            "optimizer.load_state_dict(checkpoint) after it; to go on from the "
            f"{', '.join(half)} weights anyway, delete the key {MASTERS_KEY!r} from each of "
            "optimizer.param_groups"
        )


def refuse_sparse_gradients(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse a model whose layers make sparse gradients for ``optimizer``'s parameters
    (``nn.Embedding(sparse=True)``): host buckets hold and step dense gradients only.

    >>> emb = nn.Embedding(10, 4, sparse=True)
    >>> refuse_sparse_gradients(emb, torch.optim.SGD(emb.parameters(), lr=0.1))
    Traceback (most recent call last):
    ...
    allocators.errors.OffloadError: module '' (Embedding) has sparse=True: ...
    """
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "sparse", False) is True and id(weight) in optimized:
            raise OffloadError(
                f"module {name!r} ({type(module).__name__}) has sparse=True: its gradient is "
                "sparse, and optimizer offload moves and steps dense gradients only. Build it "
                "with sparse=False (AdamW then updates it like any weight), or pass "
                "optimizer_offload=False to offload.enable() (activations are still offloaded)"
            )


@dataclass(eq=False)
class ParamSlot:
    """One trainable parameter and its host copies: fp32 master and gradient (param dtype)."""

    param: nn.Parameter
    master: torch.Tensor | None
    grad: torch.Tensor | None
    staging: torch.Tensor | None
    half: torch.Tensor | None
    arrivals: int = 0
    pending_add: CopyEvent | None = None


@dataclass(eq=False)
class GradBucket:
    """Parameters whose gradients travel and get stepped together, and their host blocks."""

    index: int
    slots: list[ParamSlot]
    blocks: list[HostBlock]
    copies: list[CopyEvent] = field(default_factory=list)
    read_done: CopyEvent | None = None
    future: Future | None = None
    stepped: bool = False

    @property
    def micro_step(self) -> int:
        return min(slot.arrivals for slot in self.slots)


class OptimizerOffload:
    """Keep ``optimizer``'s params' masters and state on the host and step them there.

    ``step()``, ``zero_grad()``, ``state_dict()`` and ``load_state_dict()`` are what the patched
    user optimizer calls. Gradients leave the device from post-accumulate-grad hooks, and the
    device gradient is dropped at once (its memory returns when the D2H copy is done).

    >>> from allocators.sysfs_topology import discover
    >>> model = nn.Linear(4, 2)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> mem = HostMemory(discover(), {"dram": "1GiB"})
    >>> off = OptimizerOffload(opt, mem, CopyStreams(torch.device("cpu")))
    >>> model(torch.ones(3, 4)).sum().backward()
    >>> model.weight.grad is None, off.step()
    (True, None)
    >>> off.close(); mem.close()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        memory: HostMemory,
        streams: CopyStreams,
        *,
        bucket_nbytes: int = 32 << 20,
        grad_accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        overlap_step: bool = True,
        threads: int | None = None,
        contention: ContentionPolicy | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.memory = memory
        self.streams = streams
        self.grad_accumulation_steps = grad_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.early_step = overlap_step and max_grad_norm is None
        # The first step is never stepped early: it shows whether the loop clips with
        # torch.nn.utils.clip_grad_norm_, which needs every gradient before any is applied.
        self._first_window = True
        self.loop_clips = False
        self.last_grad_norm: torch.Tensor | None = None
        # H2D copies of updated params not known to have finished; list.append is atomic, and
        # the worker thread appends while the autograd thread runs.
        self._copy_backs: list[CopyEvent] = []
        self.optimizer_ms = 0.0
        self.wait_ms = 0.0
        # Running totals of host optimizer work (any thread), read by the dashboard:
        # host_step_ms is the time at least one bucket was being stepped.
        self.stepped_elements = 0
        self.host_step_ms = 0.0
        self._steps_lock = threading.Lock()
        self._steps_running = 0
        self._busy_since = 0.0
        # Steps abandoned after part of the model was already updated (see zero_grad).
        self.partial_steps = 0
        self._warned_forward_before_step = False
        # Params the user's loop clipped this window (torch.nn.utils.clip_grad_norm_, routed),
        # and whether it read or changed the gradients at all (a norm read with max_norm=inf,
        # as Trainer does to log it; clip_grad_value_).
        self._clipped_ids: set[int] = set()
        self._loop_read_grads = False
        self._state_blocks: list[HostBlock] = []
        refuse_unsteppable(optimizer)
        self._check_params()
        refuse_dropped_masters(optimizer)
        # Frozen parameters (requires_grad=False, as LoRA leaves a base model) are skipped, as
        # torch skips a parameter without a gradient: no host copy, no hook, no state.
        self.frozen = [
            p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad
        ]
        self.buckets: list[GradBucket] = []
        self.host: HostStep | None = None
        # What __init__ did, undone in reverse by close(), or at once if __init__ fails: the
        # user's model and optimizer are then as they were and no host block stays taken.
        self._undo = ExitStack()
        try:
            self._install(optimizer, bucket_nbytes, threads, contention)
        except BaseException as exc:
            # The failed frames hold views of the host blocks; the blocks cannot go back
            # while they do.
            traceback.clear_frames(exc.__traceback__)
            self._undo.close()
            raise

    def _install(
        self,
        optimizer: torch.optim.Optimizer,
        bucket_nbytes: int,
        threads,
        contention: ContentionPolicy | None,
    ) -> None:
        self._undo.callback(self._release_state_blocks)
        self._make_buckets(bucket_nbytes)
        self._slot_of = {id(s.param): s for b in self.buckets for s in b.slots}
        self._bucket_of = {id(s.param): b for b in self.buckets for s in b.slots}
        master_groups = [
            [self._slot_of[id(p)].master if p.requires_grad else None for p in group["params"]]
            for group in optimizer.param_groups
        ]
        self.host = HostStep(
            optimizer,
            master_groups,
            state_allocator=self._allocate_state,
            threads=threads,
            # The step's workers yield to the copies this object and the activations issue.
            contention=contention,
            dma=self.streams.dma,
        )
        self._undo.callback(self._close_host)
        for slot in self._slot_of.values():
            self.host.bind(slot.master, slot.grad, slot.half)
        if optimizer.state:
            # Training already ran on the device: carry its state over (freed there last).
            self.host.load_state_dict(optimizer.state_dict())
        for bucket in self.buckets:
            for slot in bucket.slots:
                hook = slot.param.register_post_accumulate_grad_hook(self._on_grad)
                self._undo.callback(hook.remove)
        # The user's optimizer gets its state back through its own load_state_dict.
        self._undo.callback(self._give_state_back, optimizer.load_state_dict)
        optimizer.state.clear()

    def _allocate_state(self, nbytes: int, tensor_class: str):
        block = self.memory.allocate(tensor_class, nbytes)
        self._state_blocks.append(block)
        return block.tensor(torch.uint8, (nbytes,))

    def _release_state_blocks(self) -> None:
        blocks, self._state_blocks = self._state_blocks, []
        for block in blocks:
            self.memory.release(block)

    def _close_host(self) -> None:
        # The inner optimizer keeps views of the masters and of its state; drop it first.
        host, self.host = self.host, None
        host.close()

    def _give_state_back(self, load_state_dict) -> None:
        self.zero_grad_pending_check()
        if self.host.has_state():
            load_state_dict(self.host.state_dict())

    def _check_params(self) -> None:
        seen = set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen:
                    raise OffloadError("a parameter appears twice in the optimizer's groups")
                seen.add(id(p))
                if p.requires_grad and not p.is_floating_point():
                    raise OffloadError(f"parameter of dtype {p.dtype} cannot be offloaded")

    def _make_buckets(self, bucket_nbytes: int) -> None:
        # Reverse registration order approximates the order backward produces gradients in.
        entries = [
            p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad
        ][::-1]
        groups: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in entries:
            nbytes = p.numel() * p.element_size()
            if groups[-1] and size + nbytes > bucket_nbytes:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        for members in groups:
            if members:
                self.buckets.append(self._make_bucket(len(self.buckets), members))

    def _make_bucket(self, index: int, members: list[nn.Parameter]) -> GradBucket:
        master_nbytes = sum(p.numel() * 4 for p in members)
        grad_offsets, grad_nbytes = [], 0
        for p in members:
            # A view of the block's bytes must start on a multiple of its element size: a
            # float32 gradient after a bfloat16 one of odd size would not.
            grad_nbytes = -(-grad_nbytes // p.element_size()) * p.element_size()
            grad_offsets.append(grad_nbytes)
            grad_nbytes += p.numel() * p.element_size()
        bucket = GradBucket(index=index, slots=[], blocks=[])
        self._undo.callback(self._release_bucket, bucket)
        masters = self._allocate(bucket, "master_params", master_nbytes)
        grads = self._allocate(bucket, "grads", grad_nbytes)
        staging = None
        if self.grad_accumulation_steps > 1:
            # Later micro-steps land here before being summed into the host gradient.
            staging = self._allocate(bucket, "master_grads", grad_nbytes)
        slots, master_at = bucket.slots, 0
        for p, grad_at in zip(members, grad_offsets, strict=True):
            master = masters.tensor(torch.float32, tuple(p.shape), master_at)
            with torch.no_grad():
                master.copy_(p.detach())
            grad = grads.tensor(p.dtype, tuple(p.shape), grad_at)
            slots.append(
                ParamSlot(
                    param=p,
                    master=master,
                    grad=grad,
                    staging=None
                    if staging is None
                    else staging.tensor(p.dtype, tuple(p.shape), grad_at),
                    # The updated half-precision param goes where its gradient was: the step
                    # reads each gradient element before it writes that element's param, and
                    # the next gradient lands only after the copy back (it waits for the
                    # compute stream, which waits for the copy back at optimizer.step()).
                    # That saves 2 bytes per param of host memory (15 GB for a 7B model).
                    half=None if p.dtype == torch.float32 else grad,
                )
            )
            master_at += p.numel() * 4
        return bucket

    def _allocate(self, bucket: GradBucket, tensor_class: str, nbytes: int) -> HostBlock:
        block = self.memory.allocate(tensor_class, nbytes)
        bucket.blocks.append(block)
        return block

    def _release_bucket(self, bucket: GradBucket) -> None:
        # A traceback may still hold a slot (an error raised in a gradient hook): cut its views
        # so the blocks can go back to the pool.
        for slot in bucket.slots:
            slot.master = slot.grad = slot.staging = slot.half = None
        bucket.slots = []
        blocks, bucket.blocks = bucket.blocks, []
        for block in blocks:
            self.memory.release(block)

    @property
    def slots(self) -> list[ParamSlot]:
        """Every managed parameter, in the user's optimizer order."""
        return [slot for _, slot in self._indexed_slots()]

    def _indexed_slots(self) -> list[tuple[int, ParamSlot]]:
        """Managed parameters with their index in the user's optimizer's state_dict()."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return [(i, self._slot_of[id(p)]) for i, p in enumerate(params) if id(p) in self._slot_of]

    @staticmethod
    def _check_dtype(slot: ParamSlot) -> None:
        # The host gradient was laid out in the param's dtype at enable(): a model.float() or
        # model.to(bf16) since would have its gradients cast into that layout and its updated
        # values rounded through it, silently.
        if slot.grad is not None and slot.param.dtype != slot.grad.dtype:
            raise OffloadError(
                f"a parameter of shape {list(slot.param.shape)} was {slot.grad.dtype} when "
                f"offload.enable() ran and is {slot.param.dtype} now; its host copies keep "
                f"the {slot.grad.dtype} layout, so the switch would be rounded away. Change "
                "dtypes before offload.enable(), or call sess.disable(), convert the model, "
                "and enable again"
            )

    def _on_grad(self, param: nn.Parameter) -> None:
        slot = self._slot_of[id(param)]
        bucket = self._bucket_of[id(param)]
        if bucket.stepped:
            raise OffloadError(
                "backward() ran again after the last micro-step of the accumulation window "
                f"(grad_accumulation_steps={self.grad_accumulation_steps}) had already stepped "
                "these parameters; call optimizer.step() first, or pass the number of backward "
                "passes per step as grad_accumulation_steps"
            )
        self._wait_for(bucket)
        self._check_dtype(slot)
        grad = param.grad
        if grad.layout != torch.strided:
            raise OffloadError(
                f"a parameter of shape {list(param.shape)} got a {grad.layout} gradient; "
                "optimizer offload steps dense gradients only: make the layer produce dense "
                "gradients (nn.Embedding(sparse=False)), or pass optimizer_offload=False"
            )
        tiers = bucket.blocks[1].tier_shares
        if slot.arrivals > 0 and slot.staging is None:
            raise OffloadError(
                "backward() ran a second time before optimizer.step() with "
                "grad_accumulation_steps=1; pass grad_accumulation_steps=N to offload.enable() "
                "when N backward passes make one step"
            )
        if slot.arrivals == 0:
            bucket.copies.append(self.streams.d2h(grad, slot.grad, tiers))
        else:
            self._apply_pending_add(slot)
            slot.pending_add = self.streams.d2h(grad, slot.staging, tiers)
            bucket.copies.append(slot.pending_add)
        param.grad = None
        slot.arrivals += 1
        if bucket.micro_step == max(s.arrivals for s in bucket.slots):
            self._bucket_complete(bucket)

    def _bucket_complete(self, bucket: GradBucket) -> None:
        # Everything that reads these params on the device has been queued before their grads.
        bucket.read_done = self.streams.mark()
        step_now = (
            self.early_step
            and not self._first_window
            and bucket.micro_step == self.grad_accumulation_steps
        )
        if step_now:
            bucket.stepped = True
        bucket.future = self.host.submit(lambda: self._land(bucket, step_now))

    def _land(self, bucket: GradBucket, step: bool) -> Future | None:
        """Coordinator: wait for the bucket's D2H copies and sum micro-steps; with ``step``,
        start its step and return the step's future (the coordinator does not wait for it)."""
        copies, bucket.copies = bucket.copies, []
        for event in copies:
            event.synchronize()
        for slot in bucket.slots:
            self._apply_pending_add(slot)
        return self._step_bucket(bucket) if step else None

    def _land_all(self) -> None:
        """Wait for every bucket in flight and land its gradients, stepping none."""
        for bucket in self.buckets:
            self._wait_for(bucket)
            self._land(bucket, step=False)

    def _apply_pending_add(self, slot: ParamSlot) -> None:
        if slot.pending_add is not None:
            slot.pending_add.synchronize()
            slot.grad.add_(slot.staging)
            slot.pending_add = None

    def _step_bucket(self, bucket: GradBucket) -> Future:
        """Start stepping the bucket's params that got gradients; the future resolves once they
        are stepped and their copies back are queued (from the thread that finished the step)."""
        done: Future = Future()
        stepped = [s for s in bucket.slots if s.arrivals > 0]
        if not stepped:
            done.set_result(None)
            return done
        self._count_step(started=True)

        def copy_back(step: Future) -> None:
            failed = step.exception()
            self._count_step(
                started=False, elements=0 if failed else sum(s.master.numel() for s in stepped)
            )
            if failed is not None:
                done.set_exception(failed)
                return
            try:
                with torch.no_grad():
                    for slot in stepped:
                        self._copy_back(slot, bucket.read_done, bucket.blocks[0].tier_shares)
            except BaseException as exc:  # handed to whoever waits for the bucket
                done.set_exception(exc)
            else:
                done.set_result(None)

        try:
            self.host.step([s.master for s in stepped]).add_done_callback(copy_back)
        except BaseException:
            self._count_step(started=False)
            raise
        return done

    def _count_step(self, *, started: bool, elements: int = 0) -> None:
        # Buckets may step at the same time on the pool: count the busy time once.
        with self._steps_lock:
            now = time.perf_counter()
            if started:
                if self._steps_running == 0:
                    self._busy_since = now
                self._steps_running += 1
                return
            self._steps_running -= 1
            self.stepped_elements += elements
            if self._steps_running == 0:
                self.host_step_ms += (now - self._busy_since) * 1e3

    def _copy_back(self, slot: ParamSlot, after: CopyEvent | None, tiers=None) -> None:
        source = slot.master if slot.half is None else slot.half
        # Under no_grad a write into the parameter bumps its version, so a saved tensor that
        # still needed the old value would fail loudly in backward instead of going wrong.
        event = self.streams.h2d(source, slot.param, after=after, wait_compute=False, tiers=tiers)
        self._copy_backs.append(event)

    def _wait_for(self, bucket: GradBucket) -> None:
        # Read once: a forward in another thread (before_forward) may wait for it too.
        future = bucket.future
        if future is not None:
            start = time.perf_counter()
            # The landing, then the step it started, if any.
            step = future.result()
            if step is not None:
                step.result()
            self.wait_ms += (time.perf_counter() - start) * 1e3
            if bucket.future is future:
                bucket.future = None

    def step(self) -> None:
        """Finish the step: wait for buckets in flight, clip, step the rest, copy params back."""
        for p in self.frozen:
            if p.grad is not None:
                raise OffloadError(
                    f"a parameter of shape {list(p.shape)} was frozen (requires_grad=False) "
                    "when offload.enable() ran and has a gradient now: its gradient stayed on "
                    "the device and would not be stepped. Unfreeze parameters before "
                    "offload.enable(), or disable the session and enable it again"
                )
        for slot in self.slots:
            self._check_dtype(slot)
        start = time.perf_counter()
        self._land_all()
        received = [s for s in self.slots if s.arrivals > 0]
        # A clip the loop already did over every gradient is the clip: doing it twice would
        # scale by a second coefficient a hair below 1.
        loop_clipped = all(id(s.param) in self._clipped_ids for s in received)
        if self.max_grad_norm is not None and not (received and loop_clipped):
            grads = [s.grad for s in received]
            self.last_grad_norm = clip_by_global_norm(grads, self.max_grad_norm)
        steps = []
        for bucket in self.buckets:
            if not bucket.stepped:
                # Everything queued so far may read these params: the copy back waits for it
                # (a bucket some of whose params got no gradient never took its own mark).
                bucket.read_done = self.streams.mark()
                steps.append(self._step_bucket(bucket))
        # All of them, even when one failed: none may still write into a param after this.
        wait_all(steps)
        for step in steps:
            step.result()
        self._wait_for_copy_backs()
        if self._loop_read_grads:
            # The loop clips (or reads the norm): from now on every bucket waits for step().
            self.loop_clips = True
            self.early_step = False
        self._first_window = False
        self._reset_window()
        self.optimizer_ms += (time.perf_counter() - start) * 1e3

    def manages(self, params: list[torch.Tensor]) -> set[int]:
        """The ids of those of ``params`` whose gradients this object keeps on the host."""
        return {id(p) for p in params if id(p) in self._slot_of}

    def clip_grad_norm_(
        self,
        params: list[torch.Tensor],
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = False,
    ) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_(params, ...)`` for a loop under offload: the
        managed params' gradients are on the host (``param.grad`` is None on the device), so
        the norm and the scaling use the host copies, and the others' ``.grad`` as usual.

        Clipping needs every gradient of the step before any of it is applied. The first step
        is never stepped early, so a loop that clips from its first step turns early stepping
        off and is exact; one that starts clipping later, after buckets were stepped early,
        is refused with the setting to use.
        """
        self._land_all()
        managed = self.manages(params)
        if any(b.stepped for b in self.buckets):
            raise OffloadError(
                "torch.nn.utils.clip_grad_norm_ was called on parameters offload.enable() "
                "manages after part of this step had already been applied by the early step "
                "that overlaps backward; clipping needs every gradient first. Pass "
                f"max_grad_norm={max_norm} to offload.enable() (the same clip by global norm): "
                "then this call works and returns the norm. (A loop that clips from its first "
                "step needs nothing: early stepping turns itself off.) This step's early "
                "buckets were applied unclipped, so start the run again with it"
            )
        total = clip_by_global_norm(self._grads_of(params), max_norm, norm_type, error_if_nonfinite)
        self._loop_read_grads = True
        if max_norm != float("inf"):
            # A norm read with max_norm=inf scales by 1 and is no clip: max_grad_norm still is.
            self._clipped_ids |= {i for i in managed if self._slot_of[i].arrivals > 0}
        self.last_grad_norm = total
        return total

    def clip_grad_value_(self, params: list[torch.Tensor], clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_(params, ...)`` for a loop under offload: the
        managed params' host gradients are clamped to ``[-clip_value, clip_value]``, the
        others' ``.grad`` as usual. Like clipping by norm, it needs every gradient before any
        is applied, so it turns early stepping off from the next step (the first never steps
        early); one that starts after buckets were stepped early is refused.
        """
        self._land_all()
        if any(b.stepped for b in self.buckets):
            raise OffloadError(
                "torch.nn.utils.clip_grad_value_ was called on parameters offload.enable() "
                "manages after part of this step had already been applied by the early step "
                "that overlaps backward; clipping needs every gradient first. Pass "
                "overlap_step=False to offload.enable() and start the run again (a loop that "
                "clips from its first step needs nothing: early stepping turns itself off)"
            )
        for grad in self._grads_of(params):
            grad.clamp_(min=-clip_value, max=clip_value)
        self._loop_read_grads = True

    def _grads_of(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each param's gradient where it is: the host copy for a managed one, ``.grad`` for
        the others; in the caller's order, so a norm sums what torch's would, in that order."""
        grads = []
        for p in params:
            slot = self._slot_of.get(id(p))
            if slot is None and p.grad is not None:
                grads.append(p.grad)
            elif slot is not None and slot.arrivals > 0:
                grads.append(slot.grad)
        return grads

    def zero_grad(self) -> None:
        """Drop the gradients gathered since the last step (none are left on the device).

        If backward stopped (an exception, a KeyboardInterrupt) after some buckets had been
        stepped early, those parameters were updated and the others were not: this cannot be
        undone without a copy of the state, so a :class:`PartialStepWarning` says so, with the
        counts and the remedies, and ``partial_steps`` counts it.
        """
        self._land_all()
        self._warn_if_partly_stepped("optimizer.zero_grad()")
        # Params stepped early may still be on their way back: the next forward reads them.
        self._wait_for_copy_backs()
        self._reset_window()

    def before_forward(self) -> None:
        """Called before each forward of the model: a forward between backward() and
        ``optimizer.step()`` (an evaluation, a logging pass) must not read params half copied
        back. The buckets stepped early are finished and the compute stream waits for their
        copies back; the forward then reads their updated values, unlike plain torch, which a
        :class:`ForwardBeforeStepWarning` says once (``overlap_step=False`` keeps the old
        values until the step). With nothing stepped early this costs one scan of the buckets.
        """
        early = [bucket for bucket in self.buckets if bucket.stepped]
        if not early:
            return
        # The worker queues a bucket's copies back only once it has stepped it.
        for bucket in early:
            self._wait_for(bucket)
        self._wait_for_copy_backs()
        if not self._warned_forward_before_step:
            self._warned_forward_before_step = True
            updated = sum(1 for b in early for s in b.slots if s.arrivals > 0)
            warnings.warn(
                f"a forward ran after backward() and before optimizer.step(), when {updated} "
                "parameters had already been stepped while backward ran: it reads their updated "
                "values (plain torch would read the old ones until optimizer.step()). Call it "
                "after optimizer.step(), or pass overlap_step=False to offload.enable() to step "
                "only at optimizer.step(); if it starts the next micro-batch of gradient "
                "accumulation, pass grad_accumulation_steps=N instead",
                ForwardBeforeStepWarning,
                stacklevel=2,
            )

    def _wait_for_copy_backs(self) -> None:
        """Make the compute stream wait for the params' copies back. The host goes on, so those
        not finished yet are kept: close() waits for them before it frees their host blocks
        (the pool may unpin and unmap a freed block at once)."""
        for event in self._copy_backs:
            self.streams.wait(event)
        self._copy_backs = [event for event in self._copy_backs if not event.query()]

    def _warn_if_partly_stepped(self, where: str) -> None:
        stepped = [s for b in self.buckets if b.stepped for s in b.slots if s.arrivals > 0]
        if not stepped:
            return
        self.partial_steps += 1
        total = sum(len(b.slots) for b in self.buckets)
        elements = sum(s.master.numel() for s in stepped)
        warnings.warn(
            f"{where} dropped a step that was partly applied: {len(stepped)} of {total} "
            f"parameter tensors ({elements:,} elements) had already been updated by the early "
            "step that overlaps backward when the step stopped short of optimizer.step(), so "
            "those parameters and their optimizer state moved and the others did not (plain "
            "torch would have updated none). To undo it, load the last checkpoint (optimizer.load_state_dict "
            "and the model's); to make every step all-or-nothing, at the cost of the overlap, "
            "pass overlap_step=False to offload.enable()",
            PartialStepWarning,
            stacklevel=3,
        )

    def _reset_window(self) -> None:
        self._clipped_ids = set()
        self._loop_read_grads = False
        for bucket in self.buckets:
            bucket.stepped = False
            bucket.read_done = None
            bucket.copies = []
            for slot in bucket.slots:
                slot.arrivals = 0
                slot.pending_add = None

    def state_dict(self) -> dict:
        """The user optimizer's state dict format, plus ``offload_master_params`` (fp32)."""
        self.zero_grad_pending_check()
        # HostStep.state_dict already carries the user's own group settings.
        state = self.host.state_dict()
        state["offload_master_params"] = {i: s.master.clone() for i, s in self._indexed_slots()}
        if any(slot.param.dtype != torch.float32 for slot in self.slots):
            # torch's own load_state_dict drops the masters but keeps group keys: this tells a
            # later enable() that a load before it lost them.
            for group in state["param_groups"]:
                group[MASTERS_KEY] = True
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state dict from :meth:`state_dict` (or from the plain user optimizer)."""
        state = dict(state)
        masters = state.pop("offload_master_params", None)
        state["param_groups"] = [
            {k: v for k, v in group.items() if k != MASTERS_KEY} for group in state["param_groups"]
        ]
        self.host.load_state_dict(state)
        for user, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            user.update({k: v for k, v in saved.items() if k != "params"})
        self.host.sync_hyperparameters()
        with torch.no_grad():
            for i, slot in self._indexed_slots():
                # A param frozen when the state was saved has no master in it.
                source = (masters or {}).get(i)
                slot.master.copy_(slot.param.detach() if source is None else source)
                # Not through slot.half: that is the gradient buffer, which may hold gradients
                # that landed before this load.
                half = slot.master.to(slot.param.dtype)
                self.streams.h2d(half, slot.param).synchronize()

    def zero_grad_pending_check(self) -> None:
        """Wait for buckets in flight so host state is consistent before it is read."""
        for bucket in self.buckets:
            self._wait_for(bucket)

    def _hand_back_grads(self) -> None:
        """Gradients gathered since the last step and not stepped go back to ``param.grad``,
        where plain torch would have them (disable() between backward() and the step)."""
        with torch.no_grad():
            for bucket in self.buckets:
                for slot in bucket.slots:
                    if slot.arrivals > 0 and not bucket.stepped:
                        # In the param's dtype now, which a refused dtype switch may have changed.
                        slot.param.grad = slot.grad.to(
                            slot.param.device, slot.param.dtype, copy=True
                        )

    def close(self) -> None:
        """Give the user's optimizer its state back, and its gradients not stepped yet, remove the gradient hooks, stop the
        worker, wait for the copies still in flight and free the host blocks."""
        # A freed block may be unpinned and unmapped at once, so no DMA may still use one: the
        # gradients of a bucket that never completed land, and the params' copies back finish.
        self._land_all()
        for event in self._copy_backs:
            event.synchronize()
        self._copy_backs = []
        self._warn_if_partly_stepped("disable()")
        self._hand_back_grads()
        self._slot_of.clear()
        self._bucket_of.clear()
        self._undo.close()
