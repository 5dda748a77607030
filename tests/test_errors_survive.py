"""A fault while training under offload.enable(): the user's own error (or Ctrl-C) is what comes
out, the session's cleanup does not replace it, and no step is left half applied."""

from __future__ import annotations

import gc
import os
import signal
import threading
import warnings
import weakref

import pytest
import torch
from test_faults import (
    BUDGETS,
    assert_close,
    assert_released,
    assert_untouched,
    batches,
    tiny_mlp,
    train,
)

import offload
from allocators.sysfs_topology import discover
from offload.runtime.host_step import HostStep
from offload.runtime.optimizer_offload import PartialStepWarning


@pytest.fixture(scope="module")
def topology():
    return discover()


def test_disable_in_finally_keeps_the_users_error_and_frees_host_memory(topology):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batches(1)[0]
    sess = offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    buffers = [weakref.ref(a.buffer) for a in sess.memory.allocator.live_allocations]
    with pytest.raises(RuntimeError, match="non-finite"):
        try:
            (model(x) * float("inf")).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
        finally:
            sess.disable()
    assert_untouched(model, opt)
    assert_released(sess.memory)
    # Views the error's frames held went with it, and their memory with them.
    gc.collect()
    assert buffers and all(ref() is None for ref in buffers)


def test_a_ctrl_c_in_the_host_step_waits_for_the_whole_step(topology, monkeypatch):
    data = batches(2)
    reference = tiny_mlp()
    train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="256B", overlap_step=False
    ) as sess:
        train(model, opt, data[:1])
        real, calls = HostStep.step, []

        def interrupted_at_the_first_bucket(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(HostStep, "step", interrupted_at_the_first_bucket)
        x, y = data[1]
        (model(x) - y).square().mean().backward()
        with pytest.raises(KeyboardInterrupt, match="the step completed"):
            opt.step()
        assert len(calls) == len(sess.optimizer_offload.buckets) > 1
        assert sess.steps == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error", PartialStepWarning)
            opt.zero_grad()
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, expected)


def test_training_steps_run_while_a_no_grad_evaluation_thread_is_mid_forward(topology):
    """An evaluation thread is inside a no_grad forward of the model while the training thread
    runs whole steps; both run as in plain torch, and training still offloads."""
    data = batches(3)
    reference = tiny_mlp()
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), data)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inside, trained, errors = threading.Event(), threading.Event(), []

    def hold_the_evaluation(module, args, output):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            trained.wait(timeout=600)

    def evaluate():
        try:
            with torch.no_grad():
                model(torch.ones(2, 32))
        except BaseException as exc:
            errors.append(exc)

    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        handle = model[2].register_forward_hook(hold_the_evaluation)
        evaluation = threading.Thread(target=evaluate)
        evaluation.start()
        inside.wait(timeout=600)
        try:
            losses = train(model, opt, data)
        finally:
            trained.set()
            evaluation.join()
            handle.remove()
        offloaded = sess._activations.offloaded_count
    assert errors == []
    assert_close(losses, expected)
    assert offloaded == len(data) * saves_per_step(topology)


def saves_per_step(topology) -> int:
    """What one training step of tiny_mlp offloads with activation_min_nbytes=0."""
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        train(model, opt, batches(1))
        return sess._activations.offloaded_count
