"""Under autocast, the bf16 casts of weights that ops save are rebuilt in backward, not moved to
the host and back: same losses, no host bytes for them, and a loud error if a parameter changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import offload
from allocators.errors import OffloadError
from allocators.sysfs_topology import discover
from offload.runtime.activation_offload import ParamCast
from offload.tools.tiny_finetune import tiny_llama

pytest.importorskip("transformers")

STEPS = 4


def _train_under_autocast(offloaded: bool):
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sess = None
    if offloaded:
        sess = offload.enable(
            model, opt, topology=discover(), budgets={"dram": "1GiB"}, activation_min_nbytes=0
        )
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    try:
        for _ in range(STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        counts = None
        if sess is not None:
            acts = sess._activations
            counts = (acts.recast_count, acts.recast_nbytes)
    finally:
        if sess is not None:
            sess.disable()
    linear_weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return losses, counts, linear_weights


def test_weight_casts_are_rebuilt_in_backward_with_the_same_losses():
    expected, _, _ = _train_under_autocast(offloaded=False)
    losses, (count, nbytes), weights = _train_under_autocast(offloaded=True)
    assert losses == expected
    # Every linear layer's bf16 weight, every step: none of them went to the host.
    assert count == STEPS * len(weights)
    assert nbytes == STEPS * sum(w.numel() * 2 for w in weights)


def test_a_parameter_changed_before_backward_is_refused():
    param = nn.Parameter(torch.randn(4, 3))
    cast = param.to(torch.bfloat16)
    saved = ParamCast(param, cast.t())
    assert torch.equal(saved.value(), cast.t())
    with torch.no_grad():
        param.add_(1.0)
    with pytest.raises(OffloadError, match="changed in place before backward"):
        saved.value()
