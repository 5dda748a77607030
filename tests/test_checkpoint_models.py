"""Checkpoint offload (activations="checkpoint") on transformers models other than Llama: the same
losses as plain training. Gemma2's layers append to a KV cache in a training forward, which the
replay in backward appended again until wrapped layers ran without a cache."""

from __future__ import annotations

import pytest
import torch

import offload
from allocators.sysfs_topology import discover
from offload.tools.tiny_finetune import train_steps

pytest.importorskip("transformers")
from tiny_families import FAMILIES, tiny_causal_lm  # noqa: E402


def _losses(name: str, offloaded: bool) -> tuple[float, ...]:
    torch.manual_seed(0)
    model = tiny_causal_lm(name, layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    if not offloaded:
        return train_steps(model, opt, [ids] * 4)
    sess = offload.enable(
        model, opt, topology=discover(), budgets={"dram": "1GiB"}, activations="checkpoint"
    )
    try:
        return train_steps(model, opt, [ids] * 4)
    finally:
        sess.disable()


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_offload_trains_like_plain_torch(name):
    assert _losses(name, True) == pytest.approx(_losses(name, False), rel=1e-6, abs=1e-6)
