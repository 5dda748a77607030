"""The dashboard's background thread: a step subscriber of an offload session that turns the rows it
is sent and the session's counters into snapshots a few times a second and draws them (a rich Live
panel on a terminal, one log line per step elsewhere). It must never slow the step: the training
thread only hands it rows, and never waits on it or renders.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from rich.console import Console
from rich.live import Live

from offload.tools.dashboard import DashboardSnapshot, MemoryBar, log_line, render_dashboard
from offload.tools.transfer_ceilings import transfer_ceilings

if TYPE_CHECKING:
    from torch import nn

    from offload.config import OffloadConfig
    from offload.runtime.host_memory import HostMemory
    from offload.runtime.optimizer_offload import OptimizerOffload
    from offload.runtime.streams import CopyStreams

TIER_LABELS = {"dram": "DRAM", "remote_dram": "remote DRAM", "cxl": "CXL"}
_log = logging.getLogger(__name__)


class ObservedSession(Protocol):
    """What the dashboard reads of an offload.session.OffloadSession and how it subscribes to its
    steps: the dashboard knows the session by this shape rather than by importing it."""

    model: nn.Module
    config: OffloadConfig
    memory: HostMemory
    streams: CopyStreams
    records: Sequence[Any]  # the session's step rows, one per finished step
    steps: int

    def subscribe(self, subscriber: Any) -> Any: ...

    def unsubscribe(self, subscriber: Any) -> None: ...


@dataclass(frozen=True)
class _Mark:
    """Counters when a new step count was first seen: rates are differences between marks."""

    time_s: float
    steps: int
    tokens: int
    elements: int
    host_step_ms: float


class SessionProbe:
    """Turns the step rows it is sent (:meth:`on_step`) and an OffloadSession's counters into
    DashboardSnapshots; owns the forward pre-hook that counts tokens (``input_ids.numel()`` per
    forward; None when no integer ids were seen).

    Rates are averaged over the last ``window`` polls that saw a new step (each such poll marks
    the time and the counters). Only reads: the rows (complete dicts when sent), the allocator's
    usage (its lock is held for a few dict sums) and plain counters.

    >>> probe = SessionProbe(sess, optimizer=None)  # doctest: +SKIP
    >>> probe.poll()[-1].step  # doctest: +SKIP
    0
    """

    def __init__(
        self,
        session: ObservedSession,
        optimizer: OptimizerOffload | None,
        *,
        window: int = 16,
    ) -> None:
        self._session = session
        self._optimizer = optimizer
        self.tokens_seen = 0
        self._saw_ids = False
        allocator = session.memory.allocator
        self.ceilings = transfer_ceilings(
            allocator.topology, session.config.profile, allocator.budgets.node_nbytes
        )
        streams = session.streams
        self._hbm_nbytes = (
            torch.cuda.get_device_properties(streams.device).total_memory
            if streams.is_cuda
            else None
        )
        # Steps finished before the probe was made are history: neither drawn nor counted in
        # rates; only the last one is shown until a new one comes.
        self._new_rows: deque[dict] = deque()
        self._last_row = session.records[-1] if session.records else None
        self._restored = False
        self._marks: deque[_Mark] = deque([self._mark(session.steps)], maxlen=window + 1)
        self._hook = session.model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)

    def on_step(self, row: dict) -> None:
        """A finished step's row (training thread: only kept here, drawn by the poll)."""
        self._new_rows.append(row)
        self._last_row = row

    def on_restore(self, rows: list[dict]) -> None:
        """The session's rows were restored: they are history, like those before the probe."""
        self._new_rows.clear()
        self._last_row = rows[-1] if rows else None
        self._restored = True

    def _count_tokens(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.tokens_seen += ids.numel()
            self._saw_ids = True

    def _mark(self, steps: int) -> _Mark:
        opt = self._optimizer
        return _Mark(
            time_s=time.perf_counter(),
            steps=steps,
            tokens=self.tokens_seen,
            elements=opt.stepped_elements if opt else 0,
            host_step_ms=opt.host_step_ms if opt else 0.0,
        )

    def memory_bars(self) -> tuple[MemoryBar, ...]:
        """HBM (on CUDA) then each budgeted host node: bytes in use against its budget."""
        bars = []
        if self._hbm_nbytes is not None:
            device = self._session.streams.device
            used = torch.cuda.memory_allocated(device)
            bars.append(MemoryBar(f"HBM {device}", used, self._hbm_nbytes))
        for row in self._session.memory.allocator.usage():
            if row.node is not None:
                label = f"{TIER_LABELS.get(row.tier, row.tier)} node {row.node}"
                bars.append(MemoryBar(label, row.used_nbytes, row.budget_nbytes))
        return tuple(bars)

    def poll(self) -> list[DashboardSnapshot]:
        """A snapshot per optimizer step sent since the last poll (oldest first)."""
        if self._restored:
            # The step count jumped to the restored one: rates start over from it.
            self._restored = False
            self._marks.clear()
            self._marks.append(self._mark(self._session.steps))
        new = []
        while self._new_rows:
            new.append(self._new_rows.popleft())
        if not new:
            return []
        self._marks.append(self._mark(self._session.steps))
        memory = self.memory_bars()
        return [self._snapshot(row, memory) for row in new]

    def latest(self) -> DashboardSnapshot:
        """The last finished step's snapshot with the memory in use now."""
        row = self._last_row
        memory = self.memory_bars()
        if row is None:
            return DashboardSnapshot(step=None, memory=memory, **self._ceiling_fields())
        return self._snapshot(row, memory)

    def _ceiling_fields(self) -> dict:
        return {
            "h2d_ceiling_gb_per_s": self.ceilings.h2d_gb_per_s,
            "d2h_ceiling_gb_per_s": self.ceilings.d2h_gb_per_s,
            "ceiling_source": self.ceilings.source,
        }

    def _snapshot(self, row: dict, memory: tuple[MemoryBar, ...]) -> DashboardSnapshot:
        first, last = self._marks[0], self._marks[-1]
        elapsed_s = last.time_s - first.time_s
        steps_per_s = tokens_per_s = elements_per_s = None
        if last.steps > first.steps and elapsed_s > 0:
            steps_per_s = (last.steps - first.steps) / elapsed_s
            if self._saw_ids:
                tokens_per_s = (last.tokens - first.tokens) / elapsed_s
        step_ms = last.host_step_ms - first.host_step_ms
        if step_ms > 0:
            elements_per_s = (last.elements - first.elements) / (step_ms / 1e3)
        return DashboardSnapshot(
            step=row["step"],
            memory=memory,
            forward_ms=row["forward_ms"],
            backward_ms=row["backward_ms"],
            optimizer_ms=row["optimizer_ms"],
            wait_ms=row["wait_ms"],
            h2d_gb_per_s=row["h2d_gb_per_s"],
            d2h_gb_per_s=row["d2h_gb_per_s"],
            hidden_transfer_fraction=row["hidden_transfer_fraction"],
            optimizer_elements_per_s=elements_per_s,
            steps_per_s=steps_per_s,
            tokens_per_s=tokens_per_s,
            **self._ceiling_fields(),
        )

    def remove(self) -> None:
        """Remove the tokens hook from the model."""
        self._hook.remove()


class DashboardThread:
    """Draw a session's dashboard from a daemon thread until :meth:`stop`; a step subscriber of
    the session from :meth:`start` (``disable()`` stops it).

    On a terminal (``console.is_terminal``) a rich Live panel is redrawn ``refresh_per_s`` times
    a second (a frame costs rich 1-3 ms of CPU on a small loaded core, so 2 a second keeps the
    panel under 1% of the wall time; experiments/bench_dashboard_overhead.py measures it);
    otherwise one plain line per optimizer step is written to the console's file (stderr by
    default). stop() draws the steps not yet drawn, so none is missed. After stop(),
    ``cpu_s`` is the CPU time the thread used: what the dashboard cost, free of other load's noise.

    >>> dash = DashboardThread(sess, optimizer=None).start()  # doctest: +SKIP
    >>> dash.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        session: ObservedSession,
        optimizer: OptimizerOffload | None,
        *,
        console: Console | None = None,
        refresh_per_s: float = 2.0,
    ) -> None:
        if not refresh_per_s > 0:
            raise ValueError(f"refresh_per_s = {refresh_per_s!r} must be > 0, e.g. 4.0")
        self.console = console or Console(stderr=True)
        self.period_s = 1.0 / refresh_per_s
        self._session = session
        self.probe = SessionProbe(session, optimizer)
        self._stop = threading.Event()
        self.cpu_s = 0.0
        self._cpu_clock: int | None = None
        self._thread = threading.Thread(target=self._run, name="offload-dashboard", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def cpu_time_s(self) -> float:
        """CPU seconds the drawing thread has used so far: read from its own CPU clock while it
        runs (so a caller can time a window of it), ``cpu_s`` once it has ended."""
        if self._cpu_clock is not None and self._thread.is_alive():
            try:
                return time.clock_gettime(self._cpu_clock)
            except OSError:
                # It ended between the check and the read; its total is set on the way out.
                self._thread.join()
        return self.cpu_s

    def on_step(self, row: dict) -> None:
        self.probe.on_step(row)

    def on_restore(self, rows: list[dict]) -> None:
        self.probe.on_restore(rows)

    def close(self) -> None:
        self.stop()

    def start(self) -> DashboardThread:
        """Subscribe to the session's steps and start drawing; returns self."""
        self._session.subscribe(self)
        self._thread.start()
        # Taken now, while the thread surely exists: on Linux the clock names its kernel thread,
        # so a read after it ended fails cleanly instead of touching a freed pthread handle.
        self._cpu_clock = time.pthread_getcpuclockid(self._thread.ident)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Draw what is left, end the thread, unsubscribe and remove the tokens hook
        (idempotent)."""
        self._session.unsubscribe(self)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.probe.remove()

    def _run(self) -> None:
        try:
            if self.console.is_terminal:
                self._run_live()
            else:
                self._run_lines()
        except Exception:
            # A broken dashboard must not end the training run: say so once and stop drawing.
            _log.exception("the offload dashboard failed and stopped; training goes on")
        # The thread's CPU clock starts with the thread: the same clock cpu_time_s() reads.
        self.cpu_s = time.thread_time()

    def _run_lines(self) -> None:
        while True:
            stopping = self._stop.wait(self.period_s)
            for snapshot in self.probe.poll():
                print(log_line(snapshot), file=self.console.file, flush=True)
            if stopping:
                return

    def _run_live(self) -> None:
        # No stdout/stderr redirection: rich would then render inside the training thread's
        # print() calls, under Live's lock.
        shown = self.probe.latest()
        live = Live(
            render_dashboard(shown),
            console=self.console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        with live:
            while True:
                stopping = self._stop.wait(self.period_s)
                snapshots = self.probe.poll()
                snapshot = snapshots[-1] if snapshots else self.probe.latest()
                # Between steps often nothing changed; drawing costs about a millisecond.
                if snapshot != shown:
                    live.update(render_dashboard(snapshot), refresh=True)
                    shown = snapshot
                if stopping:
                    return
