"""An optimizer built for device params (capturable, tensor lr) still steps on the host under
offload.enable, and gets its own settings back at disable()."""

from __future__ import annotations

import pytest
import torch

import offload
from allocators.sysfs_topology import discover
from offload.tools.tiny_finetune import tiny_llama, train_steps

pytest.importorskip("transformers")


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(n)]


def test_a_capturable_optimizer_with_a_tensor_lr_trains_on_the_host_and_is_given_back():
    data = _batches(4)
    reference = tiny_llama(0, hidden=64, layers=2, vocab=128)
    # What the user's optimizer computes, stepped where torch allows it (CPU: not capturable).
    expected = train_steps(
        reference, torch.optim.Adam(reference.parameters(), lr=1e-3, amsgrad=True), data
    )

    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    # Built as for CUDA params: torch refuses capturable=True for CPU params at the first step,
    # so without the host settings the offloaded step would raise.
    user = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(1e-3), amsgrad=True, capturable=True
    )
    sess = offload.enable(model, user, topology=discover(), budgets={"dram": "1GiB"})
    try:
        losses = train_steps(model, user, data)
    finally:
        sess.disable()
    assert losses == pytest.approx(expected, rel=1e-6, abs=1e-7)
    group = user.param_groups[0]
    assert group["capturable"] is True
    assert isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(1e-3)
    assert user.state[group["params"][0]]["max_exp_avg_sq"].shape == group["params"][0].shape
