"""OffloadSession: what offload.enable() returns. It owns the installed pieces, records one row per
optimizer step and publishes it to its subscribers (the dashboard, the run record), and undoes
everything on disable(). It must not decide what to offload, nor draw or write anything itself.
"""

from __future__ import annotations

import gc
import sys
import traceback
import warnings
import weakref
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
from torch import nn

from allocators.errors import OffloadError
from offload.config import OffloadConfig
from offload.planning.contention_choice import ContentionChoice, choose_contention
from offload.planning.run_plan import RunPlan
from offload.runtime.activation_offload import ActivationOffloader
from offload.runtime.checkpoint_offload import LayerCheckpointing
from offload.runtime.chunked_loss import ChunkedLossPatch
from offload.runtime.clip_patch import ClipPatch
from offload.runtime.host_memory import HostMemory
from offload.runtime.optimizer_offload import (
    OptimizerOffload,
    refuse_sparse_gradients,
    refuse_unsteppable,
)
from offload.runtime.optimizer_patch import OptimizerPatch
from offload.runtime.phase_clock import PhaseClock
from offload.runtime.step_boundary import StepBoundary
from offload.runtime.streams import CopyStreams
from offload.step_subscriber import RunLog, StepRow, StepSubscriber
from optim_cpu.numa_cores import worker_cpus

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class StepRecord:
    """One optimizer step: phase times (ms), bytes moved and achieved rates, memory.

    ``forward_ms`` and ``backward_ms`` are device time on CUDA (events on the compute stream),
    host time on CPU. ``optimizer_ms`` is the host time of ``optimizer.step()`` (what the loop
    waits for); ``optimizer_host_ms`` the CPU optimizer's own compute this step, most of it
    overlapped with backward when buckets step early. ``activation_shared_nbytes``: saves of
    a tensor already offloaded that shared its host copy instead of moving again.
    ``optimizer_paced_ms``: worker-milliseconds this step the contention policy held the CPU
    optimizer's workers back while copies moved data; ``optimizer_threads`` its workers and
    ``optimizer_dma_threads`` how many of them step while a copy runs (None: no worker pool,
    the user's own optimizer class steps in one torch call).
    """

    step: int
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    wait_ms: float
    d2h_nbytes: int
    h2d_nbytes: int
    d2h_gb_per_s: float
    h2d_gb_per_s: float
    hidden_transfer_fraction: float
    peak_hbm_nbytes: int | None
    host_rss_nbytes: int
    optimizer_host_ms: float = 0.0
    activation_shared_nbytes: int = 0
    optimizer_paced_ms: float = 0.0
    optimizer_threads: int | None = None
    optimizer_dma_threads: int | None = None


class OffloadSession:
    """The running offload of one model and optimizer; use :func:`offload.enable` to make one.

    ``report()`` gives a DataFrame with a row per optimizer step; each row also goes to the
    subscribers (:meth:`subscribe`), ``run_log`` among them, which :meth:`save` writes.
    ``disable()`` (or leaving a ``with`` block) closes the subscribers, puts model and optimizer
    back as they were, keeping what training changed (parameter values, optimizer state), and
    frees every host block.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: OffloadConfig,
        memory: HostMemory,
        streams: CopyStreams,
        *,
        layers: nn.ModuleList | None,
        plan: RunPlan | None = None,
        run_log: RunLog | None = None,
    ) -> None:
        self.model = model
        # The planner's placements and predicted phases; None unless policy="planned" ran.
        self.plan = plan
        self.optimizer = optimizer
        self.config = config
        self.memory = memory
        self.streams = streams
        self.records: list[StepRow] = []
        self.steps = 0
        self._subscribers: list[StepSubscriber] = []
        self._run_log = run_log
        if run_log is not None:
            self.subscribe(run_log)
        self._clock = PhaseClock(streams.device)
        # Running totals (CPU optimizer ms, shared activation bytes, paced ms) at the last row.
        self._last_totals: tuple[float, int, float] = (0.0, 0, 0.0)
        # What the CPU optimizer does while copies move data, and why (config.contention).
        self.contention: ContentionChoice | None = None
        self._enabled = True
        self._checkpointing: LayerCheckpointing | None = None
        self._activations: ActivationOffloader | None = None
        self._optimizer: OptimizerOffload | None = None
        self._patch: OptimizerPatch | None = None
        self._clip: ClipPatch | None = None
        self._boundary: StepBoundary | None = None
        self._chunked_loss: ChunkedLossPatch | None = None
        # Every piece installed, undone in reverse by disable(), or at once if enable() fails.
        self._undo = ExitStack()
        try:
            self._install(layers)
        except BaseException as exc:
            # The frames of a half-built piece hold views of host blocks that would keep them
            # from going back; drop their locals (the traceback's lines stay) and the pieces.
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
            self.disable()
            raise

    def _install(self, layers: nn.ModuleList | None) -> None:
        config, undo = self.config, self._undo
        _claim(self.model, "model", undo)
        if self.optimizer is not None:
            _claim(self.optimizer, "optimizer", undo)
        for hook in (
            self.model.register_forward_pre_hook(lambda *_: self._clock.forward_started()),
            self.model.register_forward_hook(
                lambda *_: self._clock.forward_ended(), always_call=True
            ),
        ):
            undo.callback(hook.remove)
        if config.loss_chunk_tokens is not None:
            self._chunked_loss = ChunkedLossPatch(self.model, config.loss_chunk_tokens)
            undo.callback(self._chunked_loss.remove)
        if config.activations == "checkpoint" and layers is not None:
            self._checkpointing = LayerCheckpointing(layers)
            undo.callback(self._checkpointing.remove)
        if config.activations != "off":
            self._activations = ActivationOffloader(
                self.model,
                self.memory,
                self.streams,
                min_nbytes=config.activation_min_nbytes,
                prefetch_layers=config.prefetch_layers,
                layers=layers,
            )
            undo.callback(self._activations.remove)
        if config.optimizer_offload and self.optimizer is not None:
            refuse_unsteppable(self.optimizer)
            refuse_sparse_gradients(self.model, self.optimizer)
            threads = config.optimizer_threads or len(worker_cpus(None, None))
            self.contention = choose_contention(
                config.contention, threads=threads, profile=config.profile
            )
            self._optimizer = OptimizerOffload(
                self.optimizer,
                self.memory,
                self.streams,
                bucket_nbytes=config.bucket_nbytes,
                grad_accumulation_steps=config.grad_accumulation_steps,
                max_grad_norm=config.max_grad_norm,
                overlap_step=config.overlap_step,
                threads=config.optimizer_threads,
                contention=self.contention.policy,
            )
            undo.callback(self._optimizer.close)
            self._patch = OptimizerPatch(
                self.optimizer,
                self._optimizer,
                self._record_step,
                on_step_start=self._clock.step_started,
            )
            undo.callback(self._patch.remove)
            self._clip = ClipPatch(self._optimizer)
            undo.callback(self._clip.remove)
            hook = self.model.register_forward_pre_hook(lambda *_: self._optimizer.before_forward())
            undo.callback(hook.remove)
            hook = self.model.register_forward_pre_hook(lambda *_: self._clip.refresh())
            undo.callback(hook.remove)
        else:
            # Nothing patches the optimizer: its own step (or each backward) ends a row.
            self._boundary = StepBoundary(
                self.model, self.optimizer, self._clock.step_started, self._record_step
            )
            undo.callback(self._boundary.remove)
        if self.streams.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.streams.device)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def subscribers(self) -> tuple[StepSubscriber, ...]:
        """What receives each step's row, in the order subscribed."""
        return tuple(self._subscribers)

    def subscribe(self, subscriber: StepSubscriber) -> StepSubscriber:
        """Send ``subscriber`` every step's row from now on; ``disable()`` closes it.

        >>> sess.subscribe(dashboard)  # doctest: +SKIP
        """
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: StepSubscriber) -> None:
        """Send ``subscriber`` no more rows (it is not closed); unknown ones are ignored."""
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The total gradient norm of the last step when ``max_grad_norm`` clips (else None)."""
        return self._optimizer.last_grad_norm if self._optimizer else None

    @property
    def optimizer_offload(self) -> OptimizerOffload | None:
        """The optimizer offload (host masters and state, gradient buckets), or None when
        ``optimizer_offload=False``; its counters (``stepped_elements``, ``host_step_ms``)
        are what the report and the dashboard read."""
        return self._optimizer

    @property
    def partial_steps(self) -> int:
        """Steps abandoned after part of the model was already updated: backward stopped (an
        error, a KeyboardInterrupt) after some buckets had been stepped early. Each one also
        raised a ``PartialStepWarning`` saying how to undo it (``overlap_step=False`` prevents
        them)."""
        return self._optimizer.partial_steps if self._optimizer else 0

    def _record_step(self) -> None:
        if self._activations is not None:
            # A step boundary is a safe point: the activations backward dropped go back now,
            # so the row's host bytes are those still in use.
            self._activations.reap()
        opt = self._optimizer
        optimizer_ms = opt.optimizer_ms if opt else self._boundary.optimizer_ms
        forward_ms, backward_ms = self._clock.phases_ms()
        host_step_ms = opt.host_step_ms if opt else 0.0
        shared_nbytes = self._activations.shared_nbytes if self._activations else 0
        scheduler = opt.host.scheduler if opt else None
        paced_ms = scheduler.paced_ms if scheduler else 0.0
        counters = self.streams.collect()
        transfer_ms = counters.d2h_ms + counters.h2d_ms
        wait_ms = counters.wait_ms + (opt.wait_ms if opt else 0.0)
        hidden = 1.0 - min(1.0, wait_ms / transfer_ms) if transfer_ms > 0 else 0.0
        peak = None
        if self.streams.is_cuda:
            peak = torch.cuda.max_memory_allocated(self.streams.device)
            torch.cuda.reset_peak_memory_stats(self.streams.device)
        record = StepRecord(
            step=self.steps,
            forward_ms=forward_ms,
            backward_ms=backward_ms,
            optimizer_ms=optimizer_ms,
            wait_ms=wait_ms,
            d2h_nbytes=counters.d2h_nbytes,
            h2d_nbytes=counters.h2d_nbytes,
            d2h_gb_per_s=_gb_per_s(counters.d2h_nbytes, counters.d2h_ms),
            h2d_gb_per_s=_gb_per_s(counters.h2d_nbytes, counters.h2d_ms),
            hidden_transfer_fraction=hidden,
            peak_hbm_nbytes=peak,
            host_rss_nbytes=psutil.Process().memory_info().rss,
            optimizer_host_ms=host_step_ms - self._last_totals[0],
            activation_shared_nbytes=shared_nbytes - self._last_totals[1],
            optimizer_paced_ms=paced_ms - self._last_totals[2],
            optimizer_threads=scheduler.threads if scheduler else None,
            optimizer_dma_threads=scheduler.dma_threads if scheduler else None,
        )
        self._last_totals = (host_step_ms, shared_nbytes, paced_ms)
        row = asdict(record)
        # Columns of a part this session does not run would read as a misleading 0.
        if opt is None:
            del row["optimizer_host_ms"]
        if self._activations is None:
            del row["activation_shared_nbytes"]
        for (direction, tier), nbytes in sorted(counters.nbytes_by_tier.items()):
            row[f"{direction}_{tier}_nbytes"] = nbytes
        for tier, nbytes in self.memory.tier_nbytes().items():
            row[f"host_{tier}_nbytes"] = nbytes
        fallbacks = self.memory.fallbacks()
        row["host_unplaced_nbytes"] = fallbacks.unplaced_nbytes
        row["host_unpinned_nbytes"] = fallbacks.unpinned_nbytes
        self.records.append(row)
        self.steps += 1
        self._clock.reset()
        if opt:
            opt.optimizer_ms = 0.0
            opt.wait_ms = 0.0
        for subscriber in self.subscribers:
            subscriber.on_step(row)

    def report(self) -> pd.DataFrame:
        """One row per optimizer step (with no optimizer given, per backward through the model),
        whatever the session offloads: phase ms, bytes and GB/s per direction (and per tier),
        hidden transfer fraction, peak HBM (None on CPU), host RSS and host bytes per tier.

        ``host_unplaced_nbytes`` and ``host_unpinned_nbytes`` add up the host buffers so far
        whose placement the OS refused (mbind) and whose pinning the driver refused
        (cudaHostRegister): they work, pageable or wherever the kernel put them; their counts
        and reasons are in ``sess.memory.fallbacks()``.
        On CPU every copy is synchronous, so ``hidden_transfer_fraction`` is 0 there.
        ``optimizer_host_ms`` is there only under optimizer offload, ``activation_shared_nbytes``
        only under activation offload.
        """
        # Imported here: pandas costs a second, which the runtime should not pay to train.
        import pandas as pd

        return pd.DataFrame.from_records(self.records)

    def save(self, path: str | Path) -> Path:
        """Write the run record (``offload-run/1``: config, plan, topology, machine, step rows)
        to ``path`` for ``offload report``; read it back with ``offload.tools.run_record.load_run``.

        >>> sess.save("run.json")  # doctest: +SKIP
        PosixPath('run.json')
        """
        if self._run_log is None:
            raise OffloadError(
                "this session keeps no run record (it was built without one); make it with "
                "offload.enable(), which records every run"
            )
        return self._run_log.save(path)

    def state_dict(self) -> dict:
        """Steps taken, the report rows, and the (offloaded) optimizer state with fp32 masters."""
        state = {"steps": self.steps, "records": list(self.records)}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: optimizer state and masters, step count, report."""
        self.steps = int(state["steps"])
        self.records = list(state.get("records", []))
        for subscriber in self.subscribers:
            subscriber.on_restore(list(self.records))
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])

    def disable(self) -> None:
        """Remove every hook and patch, give the optimizer its state back, free host memory.

        Called while an exception is on its way out (in a ``finally`` or ``except`` block, or
        on leaving a ``with`` block), it never replaces that exception: a failure to clean up
        becomes a RuntimeWarning, and host blocks the exception's frames still view are freed
        when it is dropped.
        """
        if not self._enabled:
            return
        self._enabled = False
        in_flight = sys.exc_info()[1]
        try:
            try:
                # First, while everything they read is still there (the dashboard draws what
                # is left), then every installed piece in reverse.
                subscribers, self._subscribers = self._subscribers, []
                with ExitStack() as closing:
                    closing.push(self._undo)
                    for subscriber in subscribers:
                        closing.callback(subscriber.close)
            finally:
                self.memory.close(abandon_busy=in_flight is not None)
        except Exception as cleanup:
            if in_flight is None:
                raise
            if isinstance(cleanup, BufferError):
                return  # blocks the exception's frames view: abandoned, freed when it goes
            warnings.warn(
                f"offload session cleanup after {type(in_flight).__name__} failed: {cleanup}",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> OffloadSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disable()


# The models and optimizers under a live session: a second enable() on one would stack a second
# set of hooks and patches on the first (and fail at the first backward).
_IN_SESSION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _claim(obj: nn.Module | torch.optim.Optimizer, what: str, undo: ExitStack) -> None:
    """Mark ``obj`` as under this session until ``undo`` runs; refuse one already under another."""
    if obj in _IN_SESSION:
        raise OffloadError(
            f"this {what} is already under offload.enable(); a second session on it would "
            "stack its hooks and patches on the first. Keep using the session enable() "
            "returned, or call its disable() before enabling again"
        )
    _IN_SESSION[obj] = True
    undo.callback(_IN_SESSION.pop, obj, None)


def _gb_per_s(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e6) if ms > 0 else 0.0
