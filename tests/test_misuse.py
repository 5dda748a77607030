"""Misuse of offload.enable() and disable(), each done on purpose: the user gets a clear error (or
what plain torch would do), and a refused or failed enable() leaves model and optimizer as they
were, with no host block taken."""

from __future__ import annotations

import pytest
import test_faults
import torch
from test_faults import (
    BUDGETS,
    assert_close,
    assert_released,
    assert_untouched,
    batches,
    saved,
    tiny_mlp,
    train,
)
from torch import nn

import offload
from allocators.errors import OffloadError
from allocators.sysfs_topology import discover


@pytest.fixture(scope="module")
def topology():
    return discover()


# Every HostMemory offload.enable() builds during a test.
made_memories = test_faults.made_memories


def frozen_first_layer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """LoRA-style code: part of the model frozen, the optimizer built over all of it."""
    model = tiny_mlp(seed)
    model[0].requires_grad_(False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_frozen_parameters_in_the_optimizer_are_skipped_as_torch_skips_them(topology):
    data = batches(4)
    reference, ref_opt = frozen_first_layer()
    expected = train(reference, ref_opt, data)
    model, opt = frozen_first_layer()
    frozen = model[0].weight.detach().clone()
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as sess:
        losses = train(model, opt, data)
        # Nothing of the frozen layer is kept on the host.
        assert len(sess.optimizer_offload.slots) == 4
    assert_close(losses, expected)
    assert torch.equal(model[0].weight, frozen)
    # The optimizer's state is numbered as torch numbers it, with none for the frozen layer.
    assert (
        sorted(opt.state_dict()["state"]) == sorted(ref_opt.state_dict()["state"]) == [2, 3, 4, 5]
    )
    assert_released(sess.memory)


def test_a_parameter_unfrozen_after_enable_is_refused_at_the_step(topology):
    model, opt = frozen_first_layer()
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS):
        model[0].requires_grad_(True)
        with pytest.raises(OffloadError, match="frozen .* when offload.enable\\(\\) ran"):
            train(model, opt, batches(1))


def test_a_failed_enable_leaves_no_hook_and_plain_training_still_learns(
    topology, made_memories, monkeypatch
):
    real = torch.Tensor.register_post_accumulate_grad_hook
    calls = []

    def third_hook_fails(self, hook):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected: the third gradient hook cannot be registered")
        return real(self, hook)

    monkeypatch.setattr(torch.Tensor, "register_post_accumulate_grad_hook", third_hook_fails)
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match="injected"):
        offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    monkeypatch.undo()
    [memory] = made_memories
    assert_released(memory)
    assert_untouched(model, opt)
    reference = tiny_mlp()
    expected = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2), batches(3))
    assert_close(train(model, opt, batches(3)), expected)


def test_enable_twice_on_one_model_is_refused_and_the_first_session_goes_on(topology):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as first:
        with pytest.raises(OffloadError, match="model is already under offload.enable"):
            offload.enable(model, opt, topology=topology, budgets=BUDGETS)
        train(model, opt, batches(2))
        assert first.steps == 2
    assert_untouched(model, opt)
    # Once disabled, the model may be offloaded again.
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS) as again:
        train(model, opt, batches(1))
    assert again.steps == 1


def test_one_optimizer_under_two_sessions_is_refused(topology, made_memories):
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    other = tiny_mlp(1)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS):
        with pytest.raises(OffloadError, match="optimizer is already under offload.enable"):
            offload.enable(other, opt, topology=topology, budgets=BUDGETS)
        assert_released(made_memories[1])
        assert_untouched(other, torch.optim.SGD(other.parameters(), lr=0.1))
    assert_untouched(model, opt)


@pytest.mark.parametrize(
    ("make", "sparse", "message"),
    [
        (lambda m: torch.optim.LBFGS(m.parameters()), False, "LBFGS.step\\(\\) needs a closure"),
        (lambda m: torch.optim.SparseAdam(m.parameters()), True, "SparseAdam steps sparse"),
    ],
)
def test_an_optimizer_the_host_step_cannot_run_is_refused_with_what_to_use(
    topology, made_memories, make, sparse, message
):
    model = nn.Sequential(nn.Embedding(16, 8, sparse=sparse), nn.Linear(8, 1))
    opt = make(model)
    with pytest.raises(OffloadError, match=f"{message}.*optimizer_offload=False"):
        offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    assert_released(made_memories[0])
    assert_untouched(model, opt)


def test_sparse_embedding_gradients_are_refused_with_what_to_do(topology, made_memories):
    model = nn.Sequential(nn.Embedding(16, 8, sparse=True), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OffloadError, match="module '0' \\(Embedding\\) has sparse=True.*"):
        offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    assert_released(made_memories[0])
    assert_untouched(model, opt)
    # Activations alone are fine with sparse gradients.
    with offload.enable(model, opt, optimizer_offload=False, topology=topology, budgets=BUDGETS):
        model(torch.arange(4).unsqueeze(0)).sum().backward()
        opt.step()


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return (model(x).float() - y).square().mean()


def test_disable_between_backward_and_step_hands_the_gradients_back(topology):
    batch = batches(1)[0]
    reference = tiny_mlp()
    loss_of(reference, batch).backward()
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS, bucket_nbytes="256B"):
        loss_of(model, batch).backward()
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(param.grad, expected.grad)


def bf16_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = tiny_mlp().to(torch.bfloat16)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_a_bf16_checkpoint_loaded_before_enable_is_refused_and_loads_after_it(topology):
    data = [(x.bfloat16(), y) for x, y in batches(6)]
    model, opt = bf16_mlp()
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS):
        train(model, opt, data[:3])
        checkpoint = saved({"model": model.state_dict(), "optimizer": opt.state_dict()})
        straight = train(model, opt, data[3:])

    model, opt = bf16_mlp()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    with pytest.raises(OffloadError, match="dropped its fp32 master params.*after it"):
        offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    assert_untouched(model, opt)

    model, opt = bf16_mlp()
    model.load_state_dict(checkpoint["model"])
    with offload.enable(model, opt, topology=topology, budgets=BUDGETS):
        opt.load_state_dict(checkpoint["optimizer"])
        resumed = train(model, opt, data[3:])
    assert resumed == straight


def test_a_dtype_switch_after_enable_is_refused_at_the_next_backward(topology):
    model = tiny_mlp(0).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sess = offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    try:
        model.float()
        x = torch.randn(4, model[0].in_features)
        with pytest.raises(
            OffloadError, match="bfloat16 when offload.enable\\(\\) ran and is torch.float32 now"
        ):
            model(x).sum().backward()
    finally:
        sess.disable()
    assert_released(sess.memory)


def test_a_dtype_switch_between_backward_and_step_is_refused_at_step(topology):
    model = tiny_mlp(0).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sess = offload.enable(model, opt, topology=topology, budgets=BUDGETS)
    try:
        x = torch.randn(4, model[0].in_features, dtype=torch.bfloat16)
        model(x).sum().backward()
        model.float()
        with pytest.raises(OffloadError, match="convert the model, and enable again"):
            opt.step()
    finally:
        sess.disable()
    assert_released(sess.memory)
