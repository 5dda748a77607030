"""sess.report() has one row per step for every kind of session, with the columns that apply:
optimizer offload, activations only with the user's optimizer, activations only without one."""

from __future__ import annotations

import torch
from torch import nn

import offload

BUDGETS = {"dram": "1GiB"}
# Offload every saved activation, however small, so the rows have bytes to show.
SMALL = {"budgets": BUDGETS, "activation_min_nbytes": 0}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))


def train(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()


def test_activations_only_with_the_users_optimizer_has_a_row_per_step():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, optimizer_offload=False, **SMALL) as sess:
        train(model, opt, steps=3)
        report = sess.report()
    assert list(report["step"]) == [0, 1, 2]
    assert (report["d2h_nbytes"] > 0).all()  # the activations went to the host
    assert (report["optimizer_ms"] > 0).all() and (report["backward_ms"] > 0).all()
    assert "optimizer_host_ms" not in report and "activation_shared_nbytes" in report


def test_activations_only_without_an_optimizer_has_a_row_per_backward():
    model = mlp()
    with offload.enable(model, **SMALL) as sess:
        train(model, None, steps=2)
        with torch.no_grad():
            model(torch.randn(8, 16))  # no backward: no row
        report = sess.report()
    assert len(report) == 2
    assert (report["d2h_nbytes"] > 0).all() and (report["h2d_nbytes"] > 0).all()
    assert (report["forward_ms"] > 0).all() and (report["backward_ms"] > 0).all()


def test_optimizer_offload_alone_has_no_activation_columns():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, activations=False, budgets=BUDGETS) as sess:
        train(model, opt, steps=2)
        report = sess.report()
    assert len(report) == 2
    assert "activation_shared_nbytes" not in report and (report["optimizer_host_ms"] > 0).all()
