"""Saved activations: their host blocks go back to the pool from a queue the runtime drains at safe
points (never from a finalizer, which may run inside the allocator's lock), and the hooks know a
nested call of the model from a new one without walking torch's frames."""

from __future__ import annotations

import gc
import inspect
import threading

import pytest
import torch
from torch import nn

from allocators.sysfs_topology import discover
from offload.runtime.activation_offload import ActivationOffloader
from offload.runtime.host_memory import HostMemory
from offload.runtime.streams import CopyStreams


@pytest.fixture
def memory():
    mem = HostMemory(discover(), {"dram": "1GiB"})
    yield mem
    mem.close()


def offloader(model: nn.Module, memory: HostMemory) -> ActivationOffloader:
    return ActivationOffloader(model, memory, CopyStreams(torch.device("cpu")), min_nbytes=0)


class RecordingLock:
    """The allocator's lock, noting each time it is taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0

    def __enter__(self):
        self._lock.acquire()
        self.acquired += 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


def test_a_dropped_activation_goes_back_to_the_pool_at_the_next_reap(memory):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    off = offloader(model, memory)
    model(torch.randn(8, 32)).sum().backward()
    assert off.offloaded_count > 0
    # Backward dropped every activation; their blocks wait for a safe point.
    assert memory.pool_stats().in_use_nbytes > 0
    off.reap()
    assert memory.pool_stats().in_use_nbytes == 0
    off.remove()


def test_dropping_an_activation_takes_no_allocator_lock(memory):
    off = offloader(nn.Linear(4, 4), memory)
    saved = off._pack(torch.randn(64, 64))
    lock = memory.allocator._lock = RecordingLock()
    del saved
    gc.collect()
    assert lock.acquired == 0
    off.reap()
    assert lock.acquired > 0 and memory.pool_stats().in_use_nbytes == 0
    off.remove()


@pytest.mark.parametrize("backward", [True, False])
def test_remove_leaves_nothing_in_use(memory, backward):
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    off = offloader(model, memory)
    loss = model(torch.randn(8, 32)).sum()
    if backward:
        loss.backward()
    # Without backward the graph still holds its activations: remove() frees them anyway.
    off.remove()
    assert memory.pool_stats().in_use_nbytes == 0


class CallsItself(nn.Module):
    """A model whose forward calls the model again: the hooks' context must outlive the inner
    call, so what the outer call saves afterwards is offloaded too."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, inner: bool = False) -> torch.Tensor:
        h = x * self.scale if inner else self(x, inner=True)
        return (h * h).sum() if not inner else h * 2


def test_a_model_calling_itself_offloads_after_the_inner_call_returns(memory):
    model = CallsItself()
    off = offloader(model, memory)
    x = torch.randn(16, 16, requires_grad=True)
    model(x).backward()
    # The inner call saves x (for the gradient of scale); the outer call then saves h.
    assert off.offloaded_count == 2
    off.remove()


def test_the_forward_keeps_its_signature_and_comes_back_after_remove(memory):
    model = nn.Linear(4, 4)
    signature = inspect.signature(model.forward)
    off = offloader(model, memory)
    assert inspect.signature(model.forward) == signature
    off.remove()
    assert "forward" not in vars(model)
