"""The CPU optimizer scheduled around the runtime's DMA: CopyStreams raise the DMA signal while a
copy moves data (read from the copy's own events on CUDA, checked here with a fake CUDA layer),
the host step's scheduler reads that signal, and pacing it never changes a value."""

from __future__ import annotations

import threading

import pytest
import torch

from offload.runtime.streams import CopyStreams
from optim_cpu import ContentionPolicy, DmaSignal, StepScheduler


class FakeEvent:
    """A CUDA event whose completion the test decides."""

    def __init__(self, **_):
        self.done = False

    def record(self, stream=None):
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True

    def elapsed_time(self, end) -> float:
        return 1.0


class FakeStream:
    def __init__(self, *_):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, other):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_cuda(monkeypatch):
    """CopyStreams on a fake CUDA layer; returns (streams, events made, in creation order)."""
    events: list[FakeEvent] = []

    def make_event(**kw):
        events.append(FakeEvent(**kw))
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Event", make_event)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: s)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    streams = CopyStreams(torch.device("cuda"))
    return streams, events


def test_the_signal_rises_when_a_gpu_copy_starts_and_falls_when_it_ends(fake_cuda):
    streams, events = fake_cuda
    assert not streams.dma.active
    streams.h2d(torch.ones(4), torch.empty(4), wait_compute=False)
    start, end = events
    assert not streams.dma.active, "queued behind other work, not moving data yet"
    start.done = True
    assert streams.dma.active
    end.done = True
    assert not streams.dma.active


def test_a_later_copy_on_the_stream_keeps_the_signal_up_after_the_first_ends(fake_cuda):
    streams, events = fake_cuda
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.d2h(torch.ones(4), torch.empty(4))
    first_start, first_end, second_start, second_end = events
    first_start.done = first_end.done = True
    assert not streams.dma.active
    second_start.done = True
    assert streams.dma.active
    second_end.done = True
    assert not streams.dma.active


def test_either_direction_in_flight_raises_the_signal(fake_cuda):
    streams, events = fake_cuda
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.h2d(torch.ones(4), torch.empty(4))
    d2h_start, d2h_end, h2d_start, h2d_end = events
    d2h_start.done = d2h_end.done = True
    h2d_start.done = True
    assert streams.dma.active
    h2d_end.done = True
    assert not streams.dma.active


def test_finished_gpu_copies_are_forgotten_as_new_ones_are_issued(fake_cuda):
    streams, events = fake_cuda
    for _ in range(100):
        streams.d2h(torch.ones(4), torch.empty(4))
        for event in events[-2:]:
            event.done = True
    assert len(streams._unfinished["d2h"]) <= 1


def test_a_synchronous_cpu_copy_holds_the_signal_while_it_copies(monkeypatch):
    streams = CopyStreams(torch.device("cpu"))
    seen = []
    original_copy = torch.Tensor.copy_

    def watched_copy(self, src, non_blocking=False):
        seen.append(streams.dma.active)
        return original_copy(self, src)

    monkeypatch.setattr(torch.Tensor, "copy_", watched_copy)
    streams.d2h(torch.ones(4), torch.empty(4))
    streams.h2d(torch.ones(4), torch.empty(4))
    assert seen == [True, True]
    assert not streams.dma.active


def test_pauses_are_counted_as_paced_only_during_dma():
    dma = DmaSignal()
    policy = ContentionPolicy(duty_cycle_during_dma=0.5)
    with StepScheduler(threads=1, policy=policy, dma=dma) as idle:
        idle.submit([lambda: threading.Event().wait(0.002)] * 5).result(30)
    with StepScheduler(threads=1, policy=policy, dma=dma) as busy, dma.dma_active():
        busy.submit([lambda: threading.Event().wait(0.002)] * 5).result(30)
    # Read after close: a chunk's future resolves before the pause that follows it.
    assert idle.paced_ms == 0.0
    assert busy.paced_ms > 0.0


def test_a_capped_worker_held_back_while_work_waited_is_counted_as_paced():
    dma = DmaSignal()
    release = threading.Event()
    policy = ContentionPolicy(threads_during_dma=1)
    with StepScheduler(threads=2, policy=policy, dma=dma) as sched:
        assert sched.dma_threads == 1
        dma.begin()
        # Worker 0 is busy on the first chunk; worker 1 may not take the second while DMA runs.
        future = sched.submit([release.wait, lambda: None])
        threading.Event().wait(0.05)
        dma.end()
        release.set()
        future.result(30)
    assert sched.paced_ms > 0.0


def test_a_scheduler_watching_a_gpu_copy_resumes_capped_workers_when_it_ends(fake_cuda):
    streams, events = fake_cuda
    streams.h2d(torch.ones(4), torch.empty(4), wait_compute=False)
    start, end = events
    start.done = True
    names = []
    gate = threading.Event()
    policy = ContentionPolicy(threads_during_dma=1)
    with StepScheduler(threads=2, policy=policy, dma=streams.dma) as sched:
        # Worker 0 blocks on the first chunk; the others are left to worker 1.
        future = sched.submit([gate.wait] + [lambda: names.append(1)] * 4)
        threading.Event().wait(0.05)
        held = list(names)
        end.done = True  # nobody is told: the held worker must notice by asking
        for _ in range(200):
            if len(names) == 4:
                break
            threading.Event().wait(0.01)
        ran_after_copy = len(names)
        gate.set()
        future.result(30)
    assert held == [], "worker 1 must be held back while the copy runs"
    assert ran_after_copy == 4, "worker 1 must resume once the copy has finished"
