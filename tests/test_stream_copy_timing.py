"""CopyStreams' CUDA path queues each copy with its two timing events as one unit, even when two
threads (backward's hooks and the optimizer's worker) share a stream: otherwise one copy lands
between the other's events and is timed twice. Checked on CPU with a fake CUDA layer that logs
what is queued; the real streams run in the gpu-marked tests."""

from __future__ import annotations

import threading
import time

import torch

from offload.runtime.streams import CopyStreams


class FakeEvent:
    def __init__(self, log: list, **_):
        self.log = log

    def record(self, stream=None):
        self.log.append(("record", id(self), threading.get_ident()))
        time.sleep(0.0002)  # widen the window another thread could slip into

    def query(self):
        return True


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


def test_concurrent_copies_never_interleave_with_each_others_timing_events(monkeypatch):
    log: list = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: FakeEvent(log, **kw))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: s)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    original_copy = torch.Tensor.copy_

    def logged_copy(self, src, non_blocking=False):
        log.append(("copy", None, threading.get_ident()))
        return original_copy(self, src)

    monkeypatch.setattr(torch.Tensor, "copy_", logged_copy)
    streams = CopyStreams(torch.device("cpu"))
    streams.is_cuda = True
    streams._h2d_stream = FakeStream()
    monkeypatch.setattr(streams.counters, "add_timing", lambda *a: None)

    def issue(n: int) -> None:
        for _ in range(n):
            streams.h2d(torch.ones(4), torch.empty(4), wait_compute=False)

    threads = [threading.Thread(target=issue, args=(30,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 2 * 30 * 3
    for i in range(0, len(log), 3):
        start, copy, end = log[i : i + 3]
        assert [start[0], copy[0], end[0]] == ["record", "copy", "record"]
        assert start[2] == copy[2] == end[2], "another thread's copy landed inside a timed copy"
