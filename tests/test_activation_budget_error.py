"""A forward longer than the plan runs out of host budget for saved activations: the error says
where, why, and which settings need less."""

from __future__ import annotations

import pytest
import torch

import offload
from allocators.errors import BudgetExceededError
from allocators.sysfs_topology import discover
from offload.tools.tiny_finetune import tiny_llama

pytest.importorskip("transformers")


def test_a_forward_past_the_planned_tokens_says_what_to_change():
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # Planned for 64 tokens, then fed 32x more.
    sess = offload.enable(
        model,
        opt,
        topology=discover(),
        budgets={"dram": "4MiB"},
        plan_tokens=64,
        activation_min_nbytes=0,
    )
    ids = torch.randint(0, 128, (4, 512), generator=torch.Generator().manual_seed(0))
    try:
        with pytest.raises(BudgetExceededError) as caught:
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        sess.disable()
    message = str(caught.value)
    assert "tier 'dram' has a budget of 4.00 MiB" in message  # the allocator's own account
    assert "ran out of host budget for saved activations" in message
    assert "activations='checkpoint'" in message and "offload doctor --model" in message
