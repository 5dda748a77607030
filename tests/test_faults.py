"""Faults under offload.enable(), each triggered on purpose: the message says what happened and
what to do, and the session leaves no host memory, hooks or patches behind."""

from __future__ import annotations

import copy
import errno
import io
import sys
import warnings

import pytest
import torch
from torch import nn

import offload
from allocators import cuda_host, numa
from allocators.declared_topology import load_declared
from allocators.errors import BudgetExceededError, OffloadError, PlacementError
from allocators.sysfs_topology import discover
from allocators.topology import NumaNode, Topology
from offload.runtime.host_memory import HostMemory

BUDGETS = {"dram": "1GiB"}
# offload.enable the function shadows offload.enable the module on the package.
ENABLE_MODULE = sys.modules["offload.enable"]


@pytest.fixture(scope="module")
def topology():
    return discover()


@pytest.fixture(autouse=True)
def fresh_numa_warnings(monkeypatch):
    # numa warns once per (call, errno) per process; each test must see its own warning.
    monkeypatch.setattr(numa, "_warned", set())


@pytest.fixture
def made_memories(monkeypatch):
    """Every HostMemory offload.enable() builds during the test."""
    made = []

    class RecordingMemory(HostMemory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ENABLE_MODULE, "HostMemory", RecordingMemory)
    return made


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 32, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(n)
    ]


def train(model, optimizer, data) -> list[float]:
    """The user's unchanged loop."""
    losses = []
    for x, y in data:
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def assert_close(ours, reference, tol=1e-6):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (ours, reference)


def assert_untouched(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """No hook on any module or parameter, and the optimizer's own methods."""
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "forward" not in vars(module)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    for name in ("step", "zero_grad", "state_dict", "load_state_dict"):
        assert name not in vars(optimizer)


def assert_released(memory: HostMemory) -> None:
    stats = memory.pool_stats()
    assert (stats.held_nbytes, stats.in_use_nbytes) == (0, 0)
    assert memory.allocator.live_allocations == ()


def with_node_7(topology: Topology) -> Topology:
    """This machine's DRAM node plus a CXL node 7 that does not exist here."""
    card = NumaNode(id=7, kind="cxl", cpus=(), total_bytes=1 << 36, free_bytes=1 << 36)
    local = topology.tiers.local_dram[0]
    return Topology(
        nodes=(local, card),
        distances={local.id: {local.id: 10, 7: 14}, 7: {local.id: 14, 7: 10}},
        gpus=(),
        source="hand-built",
        name="dram+cxl7",
    )


def declared_node_7(tmp_path) -> Topology:
    path = tmp_path / "node7.yaml"
    path.write_text(
        "schema: offload-topology/1\n"
        "name: node7\n"
        "nodes:\n"
        "  - {id: 0, kind: dram, cpus: '0-1', capacity: 16GiB}\n"
        "  - {id: 7, kind: cxl, capacity: 64GiB}\n"
    )
    return load_declared(path)


@pytest.mark.parametrize("source", ["hand-built", "declared"])
@pytest.mark.parametrize(
    ("policy", "dram"),
    # naive_interleave puts half of every group on node 7; cxl_aware spills what 16 KiB
    # of DRAM cannot hold.
    [("naive_interleave", "1MiB"), ("cxl_aware", "16KiB")],
)
def test_a_plan_on_a_missing_node_is_refused_before_anything_is_touched(
    topology, tmp_path, made_memories, source, policy, dram
):
    topo = with_node_7(topology) if source == "hand-built" else declared_node_7(tmp_path)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    online = list(numa.online_nodes())
    with pytest.raises(PlacementError) as caught:
        offload.enable(
            model, opt, topology=topo, policy=policy, budgets={"dram": dram, "cxl": "1GiB"}
        )
    message = str(caught.value)
    assert "node 7 does not exist" in message
    assert f"online nodes with memory: {online}" in message
    assert "nothing was allocated" in message
    assert made_memories == []
    assert_untouched(model, opt)
    assert all(len(v) == 0 for v in opt.state.values())
    train(model, opt, batches(2))


def test_a_failure_while_installing_releases_what_was_already_allocated(
    topology, made_memories, monkeypatch
):
    calls = []
    real_allocate = HostMemory.allocate

    def third_allocation_fails(self, tensor_class, nbytes):
        calls.append(tensor_class)
        if len(calls) == 3:
            raise MemoryError("injected: the third host block cannot be mapped")
        return real_allocate(self, tensor_class, nbytes)

    monkeypatch.setattr(HostMemory, "allocate", third_allocation_fails)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(MemoryError, match="injected"):
        offload.enable(model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="4KiB")
    assert len(calls) == 3
    [memory] = made_memories
    assert_released(memory)
    assert_untouched(model, opt)


def test_a_budget_the_plan_cannot_meet_fails_before_training_with_the_numbers(
    topology, made_memories
):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(BudgetExceededError) as caught:
        offload.enable(model, opt, topology=topology, budgets={"dram": "1KiB"})
    message = str(caught.value)
    # The request (group size in bytes) and the budget are both in the message.
    assert "bytes)" in message and "1.00 KiB" in message and "Raise budget 'dram'" in message
    assert made_memories == []
    assert_untouched(model, opt)


def test_a_node_without_the_free_memory_refuses_a_block_and_releases_the_rest(
    topology, made_memories
):
    local = topology.tiers.local_dram[0]
    tight = Topology(
        nodes=(
            NumaNode(
                id=local.id, kind="dram", cpus=local.cpus, total_bytes=1 << 30, free_bytes=64 << 10
            ),
        ),
        distances={local.id: {local.id: 10}},
        gpus=(),
        source="tight",
    )
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(BudgetExceededError) as caught:
        offload.enable(model, opt, topology=tight, budgets=BUDGETS)
    message = str(caught.value)
    assert "had only 64.00 KiB free" in message and "nothing was allocated" in message
    assert "request of" in message
    [memory] = made_memories
    # The blocks made before the refused one went back, though the error's frames held them.
    assert memory.pool_stats().misses > 0
    assert_released(memory)
    assert_untouched(model, opt)


def test_mbind_refused_trains_on_and_counts_the_unplaced_buffers(topology, monkeypatch):
    real = numa._syscall
    monkeypatch.setattr(
        numa, "_syscall", lambda name, *a: (-1, errno.EPERM) if name == "mbind" else real(name, *a)
    )
    data = batches(3)
    reference = train(m := tiny_mlp(), torch.optim.AdamW(m.parameters(), lr=1e-3), data)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with offload.enable(
            model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
        ) as sess:
            losses = train(model, opt, data)
            report = sess.report()
            fallbacks = sess.memory.fallbacks()
            buffers = [a.buffer for a in sess.memory.allocator.live_allocations]
    assert any(issubclass(w.category, numa.NumaFallbackWarning) for w in caught)
    assert_close(losses, reference)
    assert buffers and not any(b.placement_enforced for b in buffers)
    assert fallbacks.unplaced_buffers >= len(buffers)
    assert fallbacks.unplaced_nbytes >= sum(b.nbytes for b in buffers)
    assert report["host_unplaced_nbytes"].iloc[-1] == fallbacks.unplaced_nbytes
    assert (report["host_unpinned_nbytes"] == 0).all()
    assert any("EPERM" in reason for reason in fallbacks.reasons)
    assert_released(sess.memory)


class RefusingCudart:
    """Stands in for torch.cuda.cudart(): the driver refuses every registration."""

    def cudaHostRegister(self, ptr, size, flags):
        return 2  # cudaErrorMemoryAllocation

    def cudaHostUnregister(self, ptr):
        raise AssertionError("nothing was registered, so nothing may be unregistered")


def test_pinning_refused_falls_back_to_pageable_and_counts_it(topology, monkeypatch):
    data = batches(3)
    reference = train(m := tiny_mlp(), torch.optim.AdamW(m.parameters(), lr=1e-3), data)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: RefusingCudart())
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with offload.enable(
            model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
        ) as sess:
            assert sess.memory.allocator.pin
            losses = train(model, opt, data)
            report = sess.report()
            fallbacks = sess.memory.fallbacks()
            buffers = [a.buffer for a in sess.memory.allocator.live_allocations]
    pin_warnings = [w for w in caught if issubclass(w.category, cuda_host.PinningFallbackWarning)]
    assert pin_warnings and "cudaError 2" in str(pin_warnings[0].message)
    assert_close(losses, reference)
    assert buffers and not any(b.pinned for b in buffers)
    assert all("cudaHostRegister refused" in b.pin_reason for b in buffers)
    assert fallbacks.unpinned_buffers >= len(buffers)
    assert fallbacks.unpinned_nbytes >= sum(b.nbytes for b in buffers)
    assert report["host_unpinned_nbytes"].iloc[-1] == fallbacks.unpinned_nbytes
    assert (report["host_unplaced_nbytes"] == 0).all()
    assert_released(sess.memory)


class Interrupted(RuntimeError):
    """The error a test raises mid-step."""


def raise_in_forward_of_step(model: nn.Module, step: int, exc: BaseException):
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == step:
            raise exc

    return model[2].register_forward_hook(hook)


def raise_in_backward_of_step(model: nn.Module, step: int, exc: BaseException):
    """A tensor hook on the middle layer's output: layers above it already have gradients."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == step:

            def fail(grad):
                raise exc

            output.register_hook(fail)

    return model[2].register_forward_hook(hook)


@pytest.mark.parametrize("exc_type", [Interrupted, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_error_mid_step_releases_host_memory_and_the_model_trains_on(topology, exc_type, where):
    data = batches(6)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    arm = raise_in_forward_of_step if where == "forward" else raise_in_backward_of_step
    handle = arm(model, 3, exc_type("stop here"))
    with pytest.raises(exc_type, match="stop here"):
        # Small buckets: in backward, the layers above the failing hook have stepped already.
        with offload.enable(
            model,
            opt,
            topology=topology,
            budgets=BUDGETS,
            activation_min_nbytes=0,
            bucket_nbytes="4KiB",
        ) as sess:
            train(model, opt, data)
    handle.remove()
    assert not sess.enabled
    assert_released(sess.memory)
    assert_untouched(model, opt)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    opt.zero_grad()
    later = train(model, opt, data[3:])
    assert all(torch.isfinite(torch.tensor(later)))
    if where == "forward":
        # Two whole steps ran under offload, then plain torch carries on from their state.
        reference = tiny_mlp()
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        train(reference, ref_opt, data[:2])
        assert_close(later, train(reference, ref_opt, data[3:]))


def test_a_graph_outliving_its_session_says_to_run_forward_again(topology):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batches(1)[0]
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        loss = (model(x) - y).square().mean()
    assert_released(sess.memory)
    with pytest.raises(OffloadError, match="run the forward pass again"):
        loss.backward()


def test_without_cuda_enable_runs_on_cpu_and_reports_no_hbm(topology, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        assert not sess.streams.is_cuda and not sess.memory.allocator.pin
        train(model, opt, batches(2))
        report = sess.report()
        buffers = [a.buffer for a in sess.memory.allocator.live_allocations]
    assert len(report) == 2
    assert report["peak_hbm_nbytes"].isna().all()
    assert (report["host_unpinned_nbytes"] == 0).all()
    assert buffers and all(not b.pinned and b.pin_reason == "pin=False" for b in buffers)


def saved(obj):
    """A deep copy through torch.save, as a checkpoint file would hold it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def test_state_saved_mid_run_loads_into_a_fresh_session_exactly(topology):
    data = batches(8)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as sess:
        straight = train(model, opt, data)

    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as sess:
        first = train(model, opt, data[:4])
        checkpoint = saved(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "session": sess.state_dict(),
            }
        )
    assert "offload_master_params" in checkpoint["optimizer"]

    model = tiny_mlp(seed=99)
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as sess:
        opt.load_state_dict(copy.deepcopy(checkpoint["optimizer"]))
        sess.load_state_dict(checkpoint["session"])
        assert_same_state(opt.state_dict(), checkpoint["optimizer"])
        assert sess.steps == 4
        second = train(model, opt, data[4:])
    assert first + second == straight


def test_a_checkpoint_written_under_offload_resumes_in_plain_torch(topology):
    data = batches(8)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS):
        straight = train(model, opt, data)

    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0):
        first = train(model, opt, data[:4])
        checkpoint = saved({"model": model.state_dict(), "optimizer": opt.state_dict()})

    # Another machine: no offload, no host tiers, the optimizer exactly as torch makes it.
    model = tiny_mlp(seed=99)
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(checkpoint["optimizer"])
    assert all(opt.state[p]["step"] == 4 for p in model.parameters())
    second = train(model, opt, data[4:])
    assert_close(first + second, straight)


def test_training_goes_on_in_the_same_session_after_a_keyboard_interrupt_in_forward(topology):
    """A notebook user interrupts a cell mid-forward, then runs the loop again."""
    data = batches(6)
    reference = tiny_mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    expected = train(reference, ref_opt, data[:2]) + train(reference, ref_opt, data[3:])
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = raise_in_forward_of_step(model, 3, KeyboardInterrupt("stop here"))
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, activation_min_nbytes=0
    ) as sess:
        with pytest.raises(KeyboardInterrupt):
            train(model, opt, data)
        handle.remove()
        opt.zero_grad()
        losses = train(model, opt, data[3:])
        # The interrupted forward's hooks are gone: other autograd work is not offloaded.
        offloaded = sess._activations.offloaded_count
        x = torch.randn(64, 64, requires_grad=True)
        (x * x).sum().backward()
        assert sess._activations.offloaded_count == offloaded
    assert_close(losses, expected[2:])
    assert_released(sess.memory)


def test_a_step_abandoned_after_early_buckets_stepped_is_reported_with_its_counts(topology):
    """Backward fails after the upper layers were stepped early: the user is told, not left to
    find a model that is half a step ahead."""
    from offload.runtime.optimizer_offload import PartialStepWarning

    data = batches(3)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Step 2 fails: the first step is never stepped early, the second is.
    handle = raise_in_backward_of_step(model, 2, Interrupted("stop here"))
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="256B"
    ) as sess:
        with pytest.raises(Interrupted):
            train(model, opt, data)
        handle.remove()
        with pytest.warns(PartialStepWarning, match=r"of 6 parameter tensors .*overlap_step=False"):
            opt.zero_grad()
        assert sess.partial_steps == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", PartialStepWarning)
            opt.zero_grad()
            train(model, opt, data[2:])
    assert sess.partial_steps == 1


def test_without_overlap_an_abandoned_step_changes_nothing(topology):
    """overlap_step=False makes every step all-or-nothing: skipping the failed batch gives
    exactly what plain torch gives when the same batch is skipped."""
    data = batches(5)
    reference = tiny_mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    expected = train(reference, ref_opt, data[:1]) + train(reference, ref_opt, data[2:])
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = raise_in_backward_of_step(model, 2, Interrupted("stop here"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with offload.enable(
            model,
            opt,
            topology=topology,
            budgets=BUDGETS,
            bucket_nbytes="256B",
            overlap_step=False,
        ) as sess:
            losses = train(model, opt, data[:1])
            with pytest.raises(Interrupted):
                train(model, opt, data[1:2])
            handle.remove()
            opt.zero_grad()
            losses += train(model, opt, data[2:])
    assert sess.partial_steps == 0
    assert_close(losses, expected)


def train_clipping(model, optimizer, data, max_norm=0.05) -> list[float]:
    """A loop that clips as most loops do, through torch's function."""
    losses = []
    for x, y in data:
        loss = (model(x) - y).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("settings", [{}, {"max_grad_norm": 0.05}, {"overlap_step": False}])
def test_a_loop_that_clips_with_torch_clips_the_host_gradients(topology, settings):
    data = batches(6)
    reference = tiny_mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    expected = train_clipping(reference, ref_opt, data)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(
        model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="256B", **settings
    ) as sess:
        losses = train_clipping(model, opt, data)
        # The norm the loop got back is the real one, not the 0 of an empty gradient list.
        assert float(sess.last_grad_norm) > 0.05
        assert sess.optimizer_offload.loop_clips
    assert_close(losses, expected)
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"


def test_clipping_after_an_early_step_is_refused_with_the_setting_to_use(topology):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    from offload.runtime.optimizer_offload import PartialStepWarning

    with (
        pytest.warns(PartialStepWarning, match="6 of 6 parameter tensors"),
        offload.enable(model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="256B"),
    ):
        # A loop that starts clipping only after steps ran with early buckets.
        train(model, opt, batches(1))
        with pytest.raises(OffloadError, match=r"max_grad_norm=0\.05 to offload\.enable"):
            train_clipping(model, opt, batches(1))
        # Parameters outside the session still clip through torch's own code.
        other = nn.Linear(3, 1)
        other(torch.ones(2, 3)).sum().backward()
        assert float(torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)) > 0
