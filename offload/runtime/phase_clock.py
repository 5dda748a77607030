"""When forward ran and when backward ran, per optimizer step: host clock on CPU, CUDA events on the
compute stream on a GPU (host timestamps there only time how fast kernels were queued). It must
not synchronise the device except when a step's figures are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class _Stamp:
    host_s: float
    event: torch.cuda.Event | None = None

    def ms_until(self, later: _Stamp) -> float:
        if self.event is not None and later.event is not None:
            later.event.synchronize()
            return self.event.elapsed_time(later.event)
        return (later.host_s - self.host_s) * 1e3


class PhaseClock:
    """Forward spans (one per micro-step) and the step's start, turned into ms per phase.

    ``backward_ms`` is what ran between the end of the last forward and ``optimizer.step()``:
    backward, and whatever the loop does before stepping.

    >>> clock = PhaseClock()
    >>> clock.forward_started(); clock.forward_ended(); clock.step_started()
    >>> forward_ms, backward_ms = clock.phases_ms()
    >>> forward_ms >= 0 and backward_ms >= 0
    True
    >>> clock.reset(); clock.phases_ms()
    (0.0, 0.0)
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None and device.type == "cuda" else None
        self._forward_start: _Stamp | None = None
        self._forwards: list[tuple[_Stamp, _Stamp]] = []
        self._step_start: _Stamp | None = None

    def _stamp(self) -> _Stamp:
        event = None
        if self.device is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        return _Stamp(time.perf_counter(), event)

    def forward_started(self) -> None:
        self._forward_start = self._stamp()

    def forward_ended(self) -> None:
        if self._forward_start is not None:
            self._forwards.append((self._forward_start, self._stamp()))
            self._forward_start = None

    def step_started(self) -> None:
        self._step_start = self._stamp()

    def phases_ms(self) -> tuple[float, float]:
        """(forward ms summed over the step's micro-steps, backward ms), waiting on the device
        for the step's start event on CUDA."""
        forward_ms = sum((start.ms_until(end) for start, end in self._forwards), 0.0)
        backward_ms = 0.0
        if self._forwards and self._step_start is not None:
            backward_ms = max(0.0, self._forwards[-1][1].ms_until(self._step_start))
        return forward_ms, backward_ms

    def reset(self) -> None:
        self._forwards = []
        self._step_start = None
