"""TieredKVCache's copy ordering: with copies that run as late as the events allow (as a GPU
may run them), generation still gives DynamicCache's tokens. Catches a missing wait on CPU.
Also: the copies' timing events stay bounded in a long run that never collects."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

from allocators.topology import NumaNode, Topology
from offload.kv_cache.cache import TieredKVCache
from offload.runtime.host_memory import HostMemory
from offload.runtime.streams import CopyStreams, TransferCounters
from offload.tools.tiny_finetune import tiny_llama


@dataclass(eq=False)
class LateCopy:
    """A queued copy; it runs only when something must see its result."""

    src: torch.Tensor | None
    dst: torch.Tensor | None
    after: LateCopy | None
    queue: list = field(repr=False)
    done: bool = False


@dataclass
class Totals:
    h2d_nbytes: int = 0
    d2h_nbytes: int = 0


class LateStreams:
    """CopyStreams' interface with each direction an in-order queue run as late as possible.

    The compute "stream" is the host (it runs at once), so a copy that waits for compute sees
    everything issued before it; its source is read and its destination written only when an
    event on it, or a later one on its queue, is waited for.
    """

    def __init__(self) -> None:
        self.h2d_queue: list[LateCopy] = []
        self.d2h_queue: list[LateCopy] = []
        self.totals = Totals()
        self.deferred_runs = 0

    def h2d(self, src, dst, after=None, wait_compute=True, tiers=None) -> LateCopy:
        self.totals.h2d_nbytes += src.numel() * src.element_size()
        copy = LateCopy(src, dst, after, self.h2d_queue)
        self.h2d_queue.append(copy)
        return copy

    def d2h(self, src, dst, tiers=None) -> LateCopy:
        self.totals.d2h_nbytes += src.numel() * src.element_size()
        copy = LateCopy(src, dst, None, self.d2h_queue)
        self.d2h_queue.append(copy)
        return copy

    def wait(self, event: LateCopy | None) -> None:
        while event is not None and not event.done:
            head = event.queue.pop(0)
            self.wait(head.after)
            head.dst.copy_(head.src)
            # A finished CUDA event holds no tensors; neither may this (the pool counts views).
            head.src = head.dst = None
            head.done = True
            self.deferred_runs += 1

    host_wait = wait

    def collect(self) -> Totals:
        for queue in (self.d2h_queue, self.h2d_queue):
            if queue:
                self.wait(queue[-1])
        done, self.totals = self.totals, Totals()
        return done


@pytest.fixture(scope="module")
def model():
    # Four layers: with three slots one stays resident and three rotate through two.
    return tiny_llama(0, hidden=64, layers=4, vocab=128).eval()


def generate(model, ids, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)


@pytest.mark.parametrize("hbm_layers", [1, 2, 3, 4])
def test_late_copies_still_give_dynamic_cache_tokens(model, hbm_layers):
    ids = torch.randint(0, 128, (1, 21), generator=torch.Generator().manual_seed(5))
    expected = generate(model, ids, DynamicCache())
    node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="test machine")
    mem = HostMemory(topo, {"dram": "64MiB"}, pin=False)
    with TieredKVCache(mem, device="cpu", block_tokens=8, hbm_layers=hbm_layers) as cache:
        cache.streams = LateStreams()
        assert torch.equal(generate(model, ids, cache), expected)
        assert cache.streams.deferred_runs > 0
    assert mem.pool_stats().in_use_nbytes == 0


class FakeEvent:
    """A CUDA timing event stand-in: finished or not, and the copy's milliseconds."""

    def __init__(self, ms: float = 0.0, done: bool = True) -> None:
        self.ms, self.done, self.waited = ms, done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.ms


def test_finished_timings_fold_into_the_totals_past_the_cap():
    counters = TransferCounters(max_pending_timings=8)
    for i in range(1000):
        counters.add_timing("h2d" if i % 2 else "d2h", FakeEvent(), FakeEvent(ms=1.0))
        assert len(counters.pending_timings()) <= 8
    counters.fold_timings(wait=True)
    assert (counters.h2d_ms, counters.d2h_ms) == (500.0, 500.0)
    assert counters.pending_timings() == ()


def test_unfinished_copies_stay_pending_until_the_cap_then_the_oldest_is_waited_for():
    counters = TransferCounters(max_pending_timings=4)
    ends = [FakeEvent(ms=2.0, done=False) for _ in range(6)]
    for end in ends:
        counters.add_timing("h2d", FakeEvent(), end)
    assert len(counters.pending_timings()) == 4
    assert [e.waited for e in ends] == [True, True, False, False, False, False]
    assert counters.h2d_ms == 4.0


def test_collect_returns_every_copys_time_however_many_were_folded_before():
    streams = CopyStreams(torch.device("cpu"))
    streams.counters.max_pending_timings = 16
    for _ in range(100):
        streams.counters.add_timing("d2h", FakeEvent(), FakeEvent(ms=0.5, done=False))
    done = streams.collect()
    assert done.d2h_ms == 50.0 and done.pending_timings() == ()
    assert streams.counters.max_pending_timings == 16  # the cap outlives a collect
    assert streams.collect().d2h_ms == 0.0
