"""Copy streams and completion events between the device and host buffers, with transfer counters.

On CUDA: one D2H and one H2D side stream, events instead of blocking syncs. On CPU the same calls
copy synchronously and return events that are already complete; nothing here decides what to copy.
Either way :attr:`CopyStreams.dma` says when a copy is moving data, for the CPU optimizer's pacing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from optim_cpu.contention import DmaSignal

# Copies whose timing events may wait to be read. A long decode issues thousands of copies per
# token and may never collect(), so past this many the finished ones are folded into the totals.
MAX_PENDING_TIMINGS = 4096


@dataclass
class TransferCounters:
    """Bytes moved per direction and the time the copies took (copy-stream time on CUDA).

    CUDA copies leave a (start, end) event pair whose time is read later (:meth:`add_timing`);
    at most ``max_pending_timings`` pairs are kept, the rest already folded into ``*_ms``.
    """

    d2h_nbytes: int = 0
    h2d_nbytes: int = 0
    d2h_ms: float = 0.0
    h2d_ms: float = 0.0
    wait_ms: float = 0.0
    nbytes_by_tier: dict[tuple[str, str], int] = field(default_factory=dict)
    max_pending_timings: int = MAX_PENDING_TIMINGS
    _timed: list = field(default_factory=list, repr=False)

    def add_timing(self, direction: str, start, end) -> None:
        """Keep a copy's timing events; past the cap, fold the finished ones (and, while still
        over it, wait for the oldest: the host is then that many copies ahead of the GPU).

        >>> class Done:
        ...     def query(self): return True
        ...     def synchronize(self): pass
        ...     def elapsed_time(self, end): return 0.5
        >>> c = TransferCounters(max_pending_timings=2)
        >>> for _ in range(5):
        ...     c.add_timing("h2d", Done(), Done())
        >>> len(c.pending_timings()), c.h2d_ms
        (2, 1.5)
        """
        self._timed.append((direction, start, end))
        if len(self._timed) > self.max_pending_timings:
            self.fold_timings(wait=False)
        while len(self._timed) > self.max_pending_timings:
            self._fold(*self._timed.pop(0), wait=True)

    def fold_timings(self, wait: bool) -> None:
        """Add the time of finished copies to ``d2h_ms``/``h2d_ms`` and drop their events; with
        ``wait`` every pending copy is waited for first, so none is left."""
        kept = []
        for direction, start, end in self._timed:
            if wait or end.query():
                self._fold(direction, start, end, wait)
            else:
                kept.append((direction, start, end))
        self._timed = kept

    def pending_timings(self) -> tuple:
        """The (direction, start, end) event pairs not yet folded into the totals."""
        return tuple(self._timed)

    def _fold(self, direction: str, start, end, wait: bool) -> None:
        if wait:
            end.synchronize()
        elapsed = start.elapsed_time(end)
        if direction == "d2h":
            self.d2h_ms += elapsed
        else:
            self.h2d_ms += elapsed

    def add(self, direction: str, nbytes: int, tiers: dict[str, float] | None) -> None:
        """Count ``nbytes`` moved in ``direction`` ("d2h"/"h2d"), split by host tier shares."""
        if direction == "d2h":
            self.d2h_nbytes += nbytes
        else:
            self.h2d_nbytes += nbytes
        for tier, share in (tiers or {"dram": 1.0}).items():
            key = (direction, tier)
            self.nbytes_by_tier[key] = self.nbytes_by_tier.get(key, 0) + int(nbytes * share)


class CopyEvent:
    """Completion of one copy: wait on it from the host, or make a stream wait on it.

    >>> CopyEvent(None).query()
    True
    """

    def __init__(self, event: torch.cuda.Event | None) -> None:
        self._event = event

    def query(self) -> bool:
        """True when the copy has finished."""
        return self._event is None or self._event.query()

    def synchronize(self) -> None:
        """Block this host thread (never the compute stream) until the copy has finished."""
        if self._event is not None:
            self._event.synchronize()

    def wait_on_current_stream(self) -> None:
        """Make the current device stream wait for the copy without blocking the host."""
        if self._event is not None:
            torch.cuda.current_stream(self._event.device).wait_event(self._event)


class CopyStreams:
    """Issue D2H and H2D copies on side streams (CUDA) or synchronously (CPU) and count them.

    ``dma`` is raised while a copy moves data: around a synchronous copy, and on CUDA while the
    oldest unfinished copy of a stream has started (its start event done, its end event not),
    read from the timing events each copy records anyway. The host step's scheduler reads it.

    >>> streams = CopyStreams(torch.device("cpu"))
    >>> host = torch.empty(4)
    >>> streams.d2h(torch.ones(4), host).query(), streams.counters.d2h_nbytes
    (True, 16)
    >>> streams.dma.active
    False
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.counters = TransferCounters()
        # The autograd thread and the optimizer's worker thread both copy and count.
        self._lock = threading.Lock()
        # Held while one copy and its timing events are queued (see _cuda_copy).
        self._issue_lock = threading.Lock()
        self._d2h_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self._h2d_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.dma = DmaSignal()
        # Per direction, the (start, end) events of copies not known to have finished, oldest
        # first: a stream runs its copies in order, so only the oldest can be moving data. Its
        # own lock, never held while calling out: the scheduler reads it under its own lock.
        self._unfinished: dict[str, deque] = {"d2h": deque(), "h2d": deque()}
        self._unfinished_lock = threading.Lock()
        if self.is_cuda:
            self.dma.watch(self._copying)

    def d2h(
        self, src: torch.Tensor, dst: torch.Tensor, tiers: dict[str, float] | None = None
    ) -> CopyEvent:
        """Copy device tensor ``src`` into host tensor ``dst`` once the compute stream made it.

        ``src`` stays allocated until the copy is done (record_stream), so the caller may drop it
        at once; that is how device memory is freed without a blocking sync. ``tiers`` are the
        host block's tier shares, for the per-tier byte counts.
        """
        with self._lock:
            self.counters.add("d2h", src.numel() * src.element_size(), tiers)
        if not self.is_cuda:
            return self._timed_cpu_copy(src, dst, "d2h")
        return self._cuda_copy(self._d2h_stream, src, dst, "d2h")

    def h2d(
        self,
        src: torch.Tensor,
        dst: torch.Tensor,
        after: CopyEvent | None = None,
        wait_compute: bool = True,
        tiers: dict[str, float] | None = None,
    ) -> CopyEvent:
        """Copy host tensor ``src`` into device tensor ``dst`` on the prefetch stream.

        The copy first waits for ``after`` (the D2H that filled ``src``, or a :meth:`mark`) and,
        with ``wait_compute``, for the compute stream's work so far: needed when ``dst`` is fresh
        memory the compute stream may still be using. A worker thread writing back into a
        parameter passes ``wait_compute=False`` and a mark taken when the parameter was last read,
        so it does not wait for work queued later.
        """
        with self._lock:
            self.counters.add("h2d", src.numel() * src.element_size(), tiers)
        if not self.is_cuda:
            return self._timed_cpu_copy(src, dst, "h2d")
        return self._cuda_copy(self._h2d_stream, src, dst, "h2d", wait_compute, after)

    def mark(self) -> CopyEvent:
        """An event at the current point of the compute stream (complete at once on CPU)."""
        if not self.is_cuda:
            return CopyEvent(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return CopyEvent(event)

    def wait(self, event: CopyEvent) -> None:
        """Make the compute stream wait for ``event``; the host goes on (see :meth:`host_wait`)."""
        event.wait_on_current_stream()

    def host_wait(self, event: CopyEvent) -> None:
        """Block the host until ``event`` is done and count the time as exposed wait."""
        start = time.perf_counter()
        event.synchronize()
        with self._lock:
            self.counters.wait_ms += (time.perf_counter() - start) * 1e3

    def collect(self) -> TransferCounters:
        """Return the counters since the last collect (resolving CUDA copy timings) and reset."""
        with self._lock:
            done = self.counters
            self.counters = TransferCounters(max_pending_timings=done.max_pending_timings)
        done.fold_timings(wait=True)
        return done

    def _copying(self) -> bool:
        """Whether a CUDA copy is moving data now (finished ones are dropped on the way)."""
        with self._unfinished_lock:
            for unfinished in self._unfinished.values():
                while unfinished and unfinished[0][1].query():
                    unfinished.popleft()
                if unfinished and unfinished[0][0].query():
                    return True
        return False

    def _timed_cpu_copy(self, src: torch.Tensor, dst: torch.Tensor, direction: str) -> CopyEvent:
        start = time.perf_counter()
        with self.dma.dma_active():
            dst.copy_(src)
        elapsed = (time.perf_counter() - start) * 1e3
        with self._lock:
            # A synchronous copy hides nothing: it all counts as exposed wait.
            self.counters.wait_ms += elapsed
            if direction == "d2h":
                self.counters.d2h_ms += elapsed
            else:
                self.counters.h2d_ms += elapsed
        return CopyEvent(None)

    def _cuda_copy(
        self,
        stream: torch.cuda.Stream,
        src: torch.Tensor,
        dst: torch.Tensor,
        direction: str,
        wait_compute: bool = True,
        after: CopyEvent | None = None,
    ) -> CopyEvent:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        # The autograd thread and the optimizer's worker both issue on the H2D stream: without
        # the lock one's copy could land between the other's start and end events, and its time
        # would be counted twice.
        with self._issue_lock:
            if after is not None and after._event is not None:
                stream.wait_event(after._event)
            if wait_compute:
                stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
            # Under the issue lock, so the deque is in the stream's order.
            with self._unfinished_lock:
                unfinished = self._unfinished[direction]
                # Dropping finished copies here too keeps it bounded when nobody reads the signal.
                while unfinished and unfinished[0][1].query():
                    unfinished.popleft()
                unfinished.append((start, end))
        device_side = src if src.is_cuda else dst
        device_side.record_stream(stream)
        with self._lock:
            self.counters.add_timing(direction, start, end)
        return CopyEvent(end)
