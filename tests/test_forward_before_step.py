"""A forward between backward() and optimizer.step() under offload.enable: ordered after the
params stepped early are back, and said once; overlap_step=False keeps plain torch's values."""

from __future__ import annotations

import warnings

import pytest
import torch

import offload
from allocators.sysfs_topology import discover
from offload.runtime.optimizer_offload import ForwardBeforeStepWarning
from offload.tools.tiny_finetune import tiny_llama

pytest.importorskip("transformers")


def _eval_between_backward_and_step(overlap_step: bool) -> tuple[list, torch.Tensor, torch.Tensor]:
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    sess = offload.enable(
        model, opt, topology=discover(), budgets={"dram": "1GiB"}, overlap_step=overlap_step
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # the first step is never stepped early
                model(input_ids=ids, labels=ids).loss.backward()
                with torch.no_grad():
                    between = model(input_ids=ids).logits
                    model(input_ids=ids)  # said once, not per forward
                opt.step()
                opt.zero_grad()
                with torch.no_grad():
                    after = model(input_ids=ids).logits
    finally:
        sess.disable()
    return [w for w in caught if issubclass(w.category, ForwardBeforeStepWarning)], between, after


def test_a_forward_after_backward_sees_the_early_stepped_params_and_is_told_once():
    said, between, after = _eval_between_backward_and_step(overlap_step=True)
    assert len(said) == 1 and "overlap_step=False" in str(said[0].message)
    # Every bucket was stepped during backward, so the forward before step() already read the
    # params step() leaves.
    assert torch.equal(between, after)


def test_without_overlap_the_forward_before_step_reads_the_old_params():
    said, between, after = _eval_between_backward_and_step(overlap_step=False)
    assert said == []
    assert not torch.allclose(between, after)
