"""`offload plan` for training: `--runtime ours` plans what offload.enable runs and allocates
(params on the device, no host copy of the weights), `--runtime deepspeed-zero3` the paper's."""

import argparse
import contextlib
import io
import json

import pytest

from offload.planning.runtime_step import OUR_RUNTIME, runtime_step
from offload.planning.simulator.step import DEEPSPEED_ZERO3
from offload.tools.plan_cli import RUNTIMES, run_plan_command


def plan_json(
    runtime: str,
    optimizer: str = "adam",
    policy: str = "planned",
    budget: tuple[str, ...] = ("dram=64GiB", "cxl=256GiB"),
) -> dict:
    args = argparse.Namespace(
        model="qwen2.5-7b",
        batch=1,
        seq=4096,
        topology="paper-1aic",
        profile=None,
        policy=policy,
        budget=list(budget),
        optimizer=optimizer,
        runtime=runtime,
        json=True,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_plan_command(args) == 0
    return json.loads(out.getvalue())


def test_ours_is_the_step_offload_enable_runs():
    assert RUNTIMES["ours"] == OUR_RUNTIME == runtime_step()
    assert RUNTIMES["ours"].offload_params is False
    assert RUNTIMES["deepspeed-zero3"] == DEEPSPEED_ZERO3


def test_ours_places_no_host_copy_of_the_weights():
    items = [g["name"] for g in plan_json("ours")["groups"]]
    assert items == [
        "momentum",
        "variance",
        "master_params",
        "activation_checkpoints",
        "compute_grads",
    ]


def test_deepspeed_zero3_json_lists_the_papers_seven_items_in_order_with_their_placement():
    items = plan_json("deepspeed-zero3", policy="cxl_aware", budget=["dram=100GiB", "cxl=256GiB"])[
        "groups"
    ]
    assert [(g["name"], g["group"]) for g in items] == [
        ("momentum", "latency_critical"),
        ("variance", "latency_critical"),
        ("master_grads", "latency_critical"),
        ("master_params", "latency_critical"),
        ("compute_params", "compute_params"),
        ("activation_checkpoints", "activation_checkpoints"),
        ("compute_grads", "compute_grads"),
    ]
    # 100 GiB of local DRAM (P = 7.6e9): three critical items fit (91.4e9), the fourth is
    # interleaved 1:1 (15.2e9 of the 16e9 left), the weights take the last 0.8e9 and the rest
    # go to CXL.
    assert [g["rule"] for g in items] == ["local"] * 3 + ["interleave"] * 2 + ["cxl_stripe"] * 2
    for item in items:
        assert sum(item["nbytes_per_node"].values()) == item["nbytes"]
        assert sum(f for _, f in item["placement"]) == pytest.approx(1.0)


def test_ours_has_no_deepspeed_overhead():
    assert plan_json("ours")["predicted_s"]["overhead"] == 0.0
    assert plan_json("deepspeed-zero3")["predicted_s"]["overhead"] > 0.0


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_lion_keeps_less_optimizer_state_than_adam(runtime):
    def critical(optimizer):
        groups = plan_json(runtime, optimizer)["groups"]
        return sum(g["nbytes"] for g in groups if g["group"] == "latency_critical")

    assert critical("lion") < critical("adam")


def test_a_budget_for_dram_alone_leaves_cxl_its_capacity_and_says_so():
    # --budget dram=100GiB alone: before, CXL got no budget and cxl_aware failed.
    data = plan_json("deepspeed-zero3", policy="cxl_aware", budget=["dram=100GiB"])
    assert data["budgets_nbytes"] == {"dram": 100 << 30, "cxl": 256 << 30}
    assert data["budgets_from_capacity"] == ["cxl"]
    assert data["groups"][-1]["rule"] == "cxl_stripe"


def test_the_placement_table_lists_items_in_order_with_the_budgets_in_its_caption():
    args = argparse.Namespace(
        model="qwen2.5-7b",
        batch=1,
        seq=4096,
        topology="paper-1aic",
        profile=None,
        policy="cxl_aware",
        budget=["dram=100GiB"],
        optimizer="adam",
        runtime="deepspeed-zero3",
        json=False,
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_plan_command(args) == 0
    text = out.getvalue()
    names = ["momentum", "variance", "master_grads", "master_params", "compute_params"]
    assert [text.index(name) for name in names] == sorted(text.index(name) for name in names)
    assert "capacity, not named" in text
