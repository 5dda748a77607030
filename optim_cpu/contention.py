"""How the optimizer yields memory bandwidth to DMA: a signal the runtime raises while copies are in
flight, and a policy that caps worker threads or paces chunks while it is up.

This module only decides; it must not start threads or time anything itself.

The rule, from experiments/bench_optimizer_contention.py (results/cpu-2core/optimizer_contention.csv;
DMA EMULATED there by a memcpy thread, on a shared 2-core VM): do not cap or pace by default.
With 21M elements, 2 workers, 10 steps and 4 GiB of copies (medians of 2 rounds), every policy
finished both sides in about the same time (makespan 0.94-1.03 s): the copy got 4.1 GiB/s with
no control and at most 4.4 GiB/s with 25% duty pacing, while the optimizer took 0.54 s unrestricted
and 0.61-0.94 s capped or paced. Neither knob made both finish sooner, so
:data:`DEFAULT_POLICY` is :data:`UNRESTRICTED`. A memcpy thread needs a core, which a GPU copy
engine does not, so this emulation cannot show the case a cap is for: a bandwidth-bound step
starving real DMA. Where the DMA rate measured during the step falls below about 90% of its rate
alone, pass ``ContentionPolicy(threads_during_dma=k)`` with the smallest k whose step still hides
under backward; that measurement needs the GPU machine and has not been taken yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class DmaSignal:
    """Counts host<->GPU transfers in flight; the optimizer's workers read it between chunks.

    Synchronous copies (and emulated DMA) call :meth:`begin`/:meth:`end`. Asynchronous GPU copies
    tell no one when they finish, so their issuer registers a probe with :meth:`watch` instead,
    asked each time the signal is read.

    >>> dma = DmaSignal()
    >>> with dma.dma_active():
    ...     dma.active
    True
    >>> dma.active
    False
    >>> copying = {"now": True}
    >>> dma.watch(lambda: copying["now"])
    >>> dma.active
    True
    >>> copying["now"] = False
    >>> dma.active
    False
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._listeners: list[Callable[[], None]] = []
        self._probes: list[Callable[[], bool]] = []

    @property
    def active(self) -> bool:
        """Whether a transfer is in flight: a begin without its end, or a probe saying so."""
        return self._in_flight > 0 or any(probe() for probe in tuple(self._probes))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin(self) -> None:
        """Count one more transfer in flight (call when a copy is launched)."""
        with self._lock:
            self._in_flight += 1
        self._notify()

    def end(self) -> None:
        """Count one transfer finished; raises if more ends than begins were signalled."""
        with self._lock:
            if self._in_flight == 0:
                raise RuntimeError("DmaSignal.end() without a matching begin(); pair every end")
            self._in_flight -= 1
        self._notify()

    @contextmanager
    def dma_active(self) -> Iterator[None]:
        """``with signal.dma_active(): copy...`` marks the block as a transfer in flight."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def watch(self, probe: Callable[[], bool]) -> None:
        """Also count DMA as active while ``probe()`` returns True (read on every :attr:`active`;
        it must be cheap and must not call back into this signal). Nothing is notified when a
        probe turns False, so waiting readers poll."""
        with self._lock:
            self._probes.append(probe)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from the signalling thread) after every begin and end."""
        with self._lock:
            self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in tuple(self._listeners):
            listener()


@dataclass(frozen=True)
class ContentionPolicy:
    """What the optimizer's workers do while DMA is in flight.

    ``threads_during_dma``: how many workers keep taking chunks (None = all of them).
    ``duty_cycle_during_dma``: fraction of time a worker computes; after a chunk that took t
    seconds it sleeps ``t * (1 - d) / d``. 1.0 means no pacing.

    >>> ContentionPolicy(threads_during_dma=1).allows(worker=1, dma_active=True)
    False
    >>> ContentionPolicy(duty_cycle_during_dma=0.5).pause_s(chunk_s=0.002, dma_active=True)
    0.002
    """

    threads_during_dma: int | None = None
    duty_cycle_during_dma: float = 1.0

    def __post_init__(self) -> None:
        cap = self.threads_during_dma
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"threads_during_dma = {cap!r}; write an int >= 1, or None for no cap")
        duty = self.duty_cycle_during_dma
        if not isinstance(duty, (int, float)) or not 0.0 < duty <= 1.0:
            raise ValueError(
                f"duty_cycle_during_dma = {duty!r}; write a fraction in (0, 1], 1.0 for no pacing"
            )

    def allows(self, worker: int, dma_active: bool) -> bool:
        """Whether worker number ``worker`` (0-based) may start a chunk now."""
        cap = self.threads_during_dma
        return not dma_active or cap is None or worker < cap

    def pause_s(self, chunk_s: float, dma_active: bool) -> float:
        """Seconds to sleep after a chunk that took ``chunk_s`` seconds."""
        duty = self.duty_cycle_during_dma
        if not dma_active or duty >= 1.0:
            return 0.0
        return chunk_s * (1.0 - duty) / duty


UNRESTRICTED = ContentionPolicy()
DEFAULT_POLICY = UNRESTRICTED
