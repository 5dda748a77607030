"""The host step: a bucket's step hands back the scheduler's future, so the thread that lands
gradients is never held by the optimizer's arithmetic; bound buffers are checked once, when bound."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from offload.runtime.host_step import HostStep
from optim_cpu import CPUAdamW


@pytest.fixture
def host():
    param = nn.Parameter(torch.ones(8))
    master = torch.ones(8)
    host = HostStep(torch.optim.AdamW([param], lr=0.1), [[master]], threads=1)
    host.bind(master, torch.ones(8))
    # Load (or build) the kernel now, not inside a timed wait below.
    assert host.inner.kernel_name
    yield host, master
    host.close()


def test_a_step_returns_while_the_scheduler_still_works_on_it(host):
    host, master = host
    gate = threading.Event()
    # The one worker waits at the gate, so the bucket's chunks queue behind it.
    host.inner.scheduler.submit([lambda: gate.wait(60)])
    # Submitted on the coordinator thread, as the gradient path does: it hands back the step's
    # future without waiting for it, so the coordinator is free for the next bucket.
    step = host.submit(lambda: host.step([master])).result(timeout=60)
    assert not step.done()
    assert host.submit(lambda: "free").result(timeout=60) == "free"
    gate.set()
    step.result(timeout=60)
    assert torch.all(master < 1.0)


def test_bound_buffers_are_checked_once_not_every_step(host, monkeypatch):
    host, master = host
    checks = []
    original = CPUAdamW._checked_grad
    monkeypatch.setattr(
        CPUAdamW, "_checked_grad", lambda self, p, g: checks.append(1) or original(self, p, g)
    )
    for _ in range(3):
        host.step([master]).result()
    assert checks == []
    other = torch.zeros(8)
    with pytest.raises(ValueError, match="grad has shape"):
        host.bind(master, other[:4])


def test_a_rebuilt_user_optimizer_steps_at_once_and_returns_a_done_future():
    param = nn.Parameter(torch.ones(2))
    master = torch.ones(2)
    host = HostStep(torch.optim.SGD([param], lr=0.5), [[master]])
    host.bind(master, torch.ones(2))
    step = host.step([master])
    assert step.done() and torch.equal(master, torch.full((2,), 0.5))
    host.close()
