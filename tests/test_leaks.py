"""Nothing accumulates: many enable/disable cycles and many steps under one session leave resident
and locked memory, mappings and host buffers where they were after a warm-up."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

import offload
from allocators.host_buffer import HostBuffer
from allocators.sysfs_topology import discover

BUDGETS = {"dram": "256MiB"}
# Resident memory may move by this fraction between two readings (allocator caches, lazily
# loaded code pages); a leak of one small buffer per step or cycle would pass it many times.
RSS_TOLERANCE = 0.02
# glibc keeps the stacks of finished threads for reuse and the optimizer's worker threads come
# and go with each session, so the number of mappings may differ by a few of those.
MAPS_SLACK = 16


@dataclass(frozen=True)
class Footprint:
    rss_nbytes: int
    locked_kib: int
    maps: int
    live_host_buffers: int


def footprint() -> Footprint:
    gc.collect()
    status = Path("/proc/self/status").read_text().splitlines()
    locked = next((int(line.split()[1]) for line in status if line.startswith("VmLck:")), 0)
    # type() rather than isinstance(): some torch proxies warn when asked for their class.
    live = sum(1 for obj in gc.get_objects() if type(obj) is HostBuffer and not obj.freed)
    return Footprint(
        rss_nbytes=psutil.Process().memory_info().rss,
        locked_kib=locked,
        maps=len(Path("/proc/self/maps").read_text().splitlines()),
        live_host_buffers=live,
    )


def assert_no_growth(before: Footprint, after: Footprint) -> None:
    assert after.rss_nbytes <= before.rss_nbytes * (1 + RSS_TOLERANCE), (before, after)
    assert after.locked_kib == before.locked_kib, (before, after)
    assert after.maps <= before.maps + MAPS_SLACK, (before, after)
    assert after.live_host_buffers == before.live_host_buffers, (before, after)


@pytest.fixture(scope="module")
def topology():
    return discover()


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def one_step(model, optimizer, x, y) -> float:
    loss = (model(x) - y).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def test_a_hundred_enable_disable_cycles_leave_nothing_behind(topology):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 1)

    def cycle():
        with offload.enable(
            model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
        ) as sess:
            one_step(model, opt, x, y)
        assert sess.memory.pool_stats().held_nbytes == 0

    for _ in range(3):
        cycle()
    before = footprint()
    for _ in range(100):
        cycle()
    after = footprint()
    assert_no_growth(before, after)
    assert after.live_host_buffers == 0
    assert all(opt.state[p]["step"] == 103 for p in model.parameters())


def test_a_thousand_steps_under_one_session_leave_nothing_behind(topology):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 1, generator=gen)
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        for _ in range(20):
            one_step(model, opt, x, y)
        before = footprint()
        pool_before = sess.memory.pool_stats()
        losses = [one_step(model, opt, x, y) for _ in range(1000)]
        after = footprint()
        pool_after = sess.memory.pool_stats()
        # Every step reuses the same pooled blocks: nothing new is mapped after the warm-up.
        assert pool_after.held_nbytes == pool_before.held_nbytes
        assert pool_after.in_use_nbytes == pool_before.in_use_nbytes
        assert pool_after.misses == pool_before.misses
    assert_no_growth(before, after)
    assert losses[-1] < losses[0]
    assert sess.steps == 1020
    assert footprint().live_host_buffers == 0
