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


def plan_json(runtime: str, optimizer: str = "adam") -> dict:
    args = argparse.Namespace(
        model="qwen2.5-7b",
        batch=1,
        seq=4096,
        topology="paper-1aic",
        profile=None,
        policy="planned",
        budget=["dram=64GiB", "cxl=256GiB"],
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
    groups = [g["name"] for g in plan_json("ours")["groups"]]
    assert groups == ["latency_critical", "activation_checkpoints", "compute_grads"]


def test_deepspeed_zero3_places_the_papers_four_groups():
    groups = [g["name"] for g in plan_json("deepspeed-zero3")["groups"]]
    assert groups == [
        "latency_critical",
        "compute_params",
        "activation_checkpoints",
        "compute_grads",
    ]


def test_ours_has_no_deepspeed_overhead():
    assert plan_json("ours")["predicted_s"]["overhead"] == 0.0
    assert plan_json("deepspeed-zero3")["predicted_s"]["overhead"] > 0.0


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_lion_keeps_less_optimizer_state_than_adam(runtime):
    def critical(optimizer):
        groups = plan_json(runtime, optimizer)["groups"]
        return next(g["nbytes"] for g in groups if g["name"] == "latency_critical")

    assert critical("lion") < critical("adam")
