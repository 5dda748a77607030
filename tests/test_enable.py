"""offload.enable() on CPU: the same losses as plain torch, and everything undone by disable()."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import offload
from allocators.errors import OffloadError
from allocators.sysfs_topology import discover
from offload.runtime.optimizer_offload import PartialStepWarning
from offload.tools.tiny_finetune import tiny_llama as shared_tiny_llama

transformers = pytest.importorskip("transformers")

STEPS = 20
BUDGETS = {"dram": "1GiB"}


@pytest.fixture(scope="module")
def topology():
    return discover()


def tiny_llama(seed: int = 0) -> nn.Module:
    return shared_tiny_llama(seed, hidden=64, layers=2, vocab=128)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 32), generator=gen) for _ in range(n)]


def train(model, optimizer, data, *, scheduler=None, accumulation=1, max_norm=None):
    """The user's unchanged loop: losses of each micro-batch."""
    losses = []
    for i, ids in enumerate(data):
        loss = model(input_ids=ids, labels=ids).loss
        (loss / accumulation).backward()
        losses.append(loss.item())
        if (i + 1) % accumulation == 0:
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
    return losses


def reference_losses(**kwargs) -> list[float]:
    model = tiny_llama()
    if kwargs.pop("checkpointing", False):
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return train(model, opt, batches(STEPS), **kwargs)


def assert_close_losses(ours, reference):
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference, strict=True):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (ours, reference)


@pytest.fixture(autouse=True)
def quiet_hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def test_twenty_steps_match_plain_torch(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model, opt, budgets=BUDGETS, topology=topology, activation_min_nbytes=0
    ) as sess:
        losses = train(model, opt, batches(STEPS))
        report = sess.report()
    assert_close_losses(losses, reference_losses())
    assert len(report) == STEPS
    assert (report["d2h_nbytes"] > 0).all() and (report["h2d_nbytes"] > 0).all()
    assert {"forward_ms", "backward_ms", "optimizer_ms", "wait_ms", "host_dram_nbytes"} <= set(
        report.columns
    )


def test_hf_gradient_checkpointing_matches(topology):
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology, activation_min_nbytes=0):
        losses = train(model, opt, batches(STEPS))
    assert_close_losses(losses, reference_losses(checkpointing=True))


def test_checkpoint_offload_mode_matches(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model,
        opt,
        activations="checkpoint",
        budgets=BUDGETS,
        topology=topology,
        activation_min_nbytes=0,
    ) as sess:
        losses = train(model, opt, batches(STEPS))
        offloaded = sess._activations.offloaded_count
    assert_close_losses(losses, reference_losses())
    # Only layer inputs (and what lies outside the layers) were saved, not every activation.
    assert 0 < offloaded < 40 * STEPS


def test_accumulation_clipping_and_scheduler_match_torch(topology):
    def run(offloaded: bool) -> tuple[list[float], list[float]]:
        model = tiny_llama()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        sess = None
        if offloaded:
            sess = offload.enable(
                model,
                opt,
                budgets=BUDGETS,
                topology=topology,
                grad_accumulation_steps=2,
                max_grad_norm=0.5,
            )
        losses = train(
            model,
            opt,
            batches(12),
            scheduler=sched,
            accumulation=2,
            max_norm=None if offloaded else 0.5,
        )
        lrs = [g["lr"] for g in opt.param_groups]
        if sess is not None:
            sess.disable()
        return losses, lrs

    ours, our_lrs = run(True)
    reference, reference_lrs = run(False)
    assert_close_losses(ours, reference)
    assert our_lrs == reference_lrs


def test_overlapped_bucket_steps_match(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Small buckets: many are stepped while backward still runs.
    with offload.enable(
        model, opt, activations=False, budgets=BUDGETS, topology=topology, bucket_nbytes=4096
    ) as sess:
        losses = train(model, opt, batches(STEPS))
        assert len(sess.optimizer_offload.buckets) > 5
    assert_close_losses(losses, reference_losses())


def test_backward_twice_without_telling_accumulation_is_an_error(topology):
    model = nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, activations=False, budgets=BUDGETS, topology=topology):
        # After the first step, buckets are stepped early in backward.
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        model(torch.ones(2, 4)).sum().backward()
        with pytest.raises(OffloadError, match="grad_accumulation_steps"):
            model(torch.ones(2, 4)).sum().backward()
        # The first backward's early step already moved the params: dropping it says so.
        with pytest.warns(PartialStepWarning, match="2 of 2 parameter tensors"):
            opt.zero_grad()


def test_disable_restores_model_and_optimizer(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params_before = list(model.parameters())
    opt_attrs_before = dict(vars(opt))
    layer_attrs_before = [dict(vars(layer)) for layer in model.model.layers]
    sess = offload.enable(model, opt, activations="checkpoint", budgets=BUDGETS, topology=topology)
    train(model, opt, batches(3))
    sess.disable()
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    for name in ("step", "zero_grad", "state_dict", "load_state_dict"):
        assert name not in vars(opt)
    assert set(vars(opt)) - set(opt_attrs_before) <= {"_opt_called"}
    assert [set(vars(layer)) for layer in model.model.layers] == [
        set(a) for a in layer_attrs_before
    ]
    hooks = [m._forward_hooks or m._forward_pre_hooks for m in model.modules()]
    assert not any(hooks)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    # The optimizer carries on, on the device, from the offloaded state.
    assert all(opt.state[p]["step"] == 3 for p in model.parameters())
    train(model, opt, batches(1))


def test_disable_frees_every_host_buffer(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sess = offload.enable(model, opt, budgets=BUDGETS, topology=topology, activation_min_nbytes=0)
    train(model, opt, batches(2))
    assert sess.memory.pool_stats().held_nbytes > 0
    sess.disable()
    stats = sess.memory.pool_stats()
    assert (stats.held_nbytes, stats.in_use_nbytes) == (0, 0)
    assert sess.memory.allocator.live_allocations == ()


def test_save_and_load_continue_identically(topology):
    data = batches(STEPS)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology):
        straight = train(model, opt, data)

    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology) as sess:
        first = train(model, opt, data[:10])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "session": sess.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    model = tiny_llama(seed=123)
    model.load_state_dict(saved["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology) as sess:
        sess.load_state_dict(saved["session"])
        second = train(model, opt, data[10:])
        assert sess.steps == STEPS
    assert first + second == straight


def test_plain_module_without_optimizer_offload(topology):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    reference = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(16, 32)
    with offload.enable(
        model,
        None,
        optimizer_offload=False,
        budgets=BUDGETS,
        topology=topology,
        activation_min_nbytes=0,
    ) as sess:
        model(x).square().sum().backward()
        assert sess._activations.offloaded_count > 0
    reference(x).square().sum().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
