"""bf16 models under optimizer offload: fp32 masters on the host, and the updated bf16 params that
go back to the model are exactly the masters rounded (they are written into the gradient's host
buffer, so a wrong order of reads and writes there would show up here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import offload
from allocators.sysfs_topology import discover

BUDGETS = {"dram": "1GiB"}


def bf16_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 1)
    )
    return model.to(torch.bfloat16)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(8, 48, generator=gen).bfloat16(), torch.randn(8, 1, generator=gen).bfloat16())
        for _ in range(n)
    ]


def reference_masters(data, accumulation: int) -> list[torch.Tensor]:
    """Mixed precision by hand: bf16 forward/backward, fp32 masters stepped by torch AdamW."""
    model = bf16_mlp()
    masters = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    for i, (x, y) in enumerate(data):
        (model(x).float() - y.float()).square().mean().backward()
        if (i + 1) % accumulation:
            continue
        for master, p in zip(masters, model.parameters(), strict=True):
            master.grad = p.grad.float()
            p.grad = None
        opt.step()
        with torch.no_grad():
            for master, p in zip(masters, model.parameters(), strict=True):
                p.copy_(master)
    return [m.detach() for m in masters]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_bf16_params_are_the_rounded_masters_after_every_step(accumulation):
    data = batches(6)
    model = bf16_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with offload.enable(
        model,
        opt,
        topology=discover(),
        budgets=BUDGETS,
        bucket_nbytes="8KiB",
        grad_accumulation_steps=accumulation,
    ) as sess:
        for i, (x, y) in enumerate(data):
            (model(x).float() - y.float()).square().mean().backward()
            if (i + 1) % accumulation:
                continue
            opt.step()
            opt.zero_grad()
            for slot in sess.optimizer_offload.slots:
                assert torch.equal(slot.param.detach(), slot.master.to(torch.bfloat16))
        masters = [slot.master.clone() for slot in sess.optimizer_offload.slots]
        # Host memory holds masters, gradients (and staging) and optimizer state: the bf16
        # params come back through the gradient buffers, not a copy of their own.
        by_class = sess.memory.allocator.usage()[0].used_nbytes_by_class
        assert by_class["params"] == 0
        assert by_class["grads"] > 0
    expected = reference_masters(data, accumulation)
    for ours, ref in zip(masters, expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
