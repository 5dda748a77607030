"""offload.enable(policy="planned"): same losses as plain torch, the plan on the session within its
budgets, measured profile rates reaching the planner, and clear errors and fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import offload
from allocators.declared_topology import load_declared
from allocators.errors import BudgetExceededError, ConfigError
from allocators.sysfs_topology import discover
from allocators.topology import NumaNode, Topology
from offload.planning.run_plan import RunPlan, model_shape, plan_run, run_placements
from offload.tools.tiny_finetune import tiny_llama as shared_tiny_llama
from offload.tools.tiny_finetune import train_steps

transformers = pytest.importorskip("transformers")

STEPS = 5
BUDGETS = {"dram": "1GiB"}
BATCH, SEQ = 2, 32


@pytest.fixture(scope="module")
def topology():
    return discover()


@pytest.fixture(autouse=True)
def quiet_hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def tiny_llama(seed: int = 0) -> nn.Module:
    return shared_tiny_llama(seed, hidden=64, layers=2, vocab=128)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (BATCH, SEQ), generator=gen) for _ in range(n)]


def train(model, optimizer, data) -> list[float]:
    return list(train_steps(model, optimizer, data))


def assert_within_budgets(run: RunPlan) -> None:
    used: dict[int, int] = {}
    for item in run.plan.result.groups:
        for node, nbytes in item.nbytes_per_node.items():
            used[node] = used.get(node, 0) + nbytes
    limits = run.plan.result.budgets.node_nbytes
    assert used and all(nbytes <= limits.get(node, 0) for node, nbytes in used.items()), (
        used,
        limits,
    )


def test_planned_matches_plain_torch_and_records_the_plan(topology):
    reference_model = tiny_llama()
    reference_opt = torch.optim.AdamW(reference_model.parameters(), lr=1e-3)
    reference = train(reference_model, reference_opt, batches(STEPS))

    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model,
        opt,
        policy="planned",
        budgets=BUDGETS,
        topology=topology,
        activation_min_nbytes=0,
        plan_tokens=BATCH * SEQ,
    ) as sess:
        losses = train(model, opt, batches(STEPS))
        run = sess.plan
        allocator_placements = dict(sess.memory.allocator.placements)
    assert len(losses) == STEPS
    for ours, theirs in zip(losses, reference, strict=True):
        assert abs(ours - theirs) <= 1e-6 * max(1.0, abs(theirs)), (losses, reference)
    assert isinstance(run, RunPlan) and run.plan.policy == "planned"
    # The items this runtime allocates: no host copy of the compute weights.
    assert list(run.placements) == [
        "momentum",
        "variance",
        "master_params",
        "activation_checkpoints",
        "compute_grads",
    ]
    assert run.seq * run.batch == BATCH * SEQ
    phases = run.predicted_s
    assert phases["total"] > 0 and phases["total"] >= phases["forward"]
    # The allocator runs with exactly the plan's placements.
    assert allocator_placements == run.by_class()
    assert_within_budgets(run)
    assert len(run.table()) == 5


def test_declared_cxl_machine_plan_spills_within_budgets():
    model = tiny_llama()
    budgets = {"dram": "1MiB", "cxl": "1GiB"}
    by_class, run = run_placements(
        model, load_declared("paper-1aic"), "planned", budgets, hidden=64, layers=2, tokens=4096
    )
    assert run is not None and by_class == run.by_class()
    assert_within_budgets(run)
    # The groups need more than 1 MiB, so some of them must go to the CXL node.
    assert any(1 in placement.nodes for placement in by_class.values())


def test_planned_refuses_budgets_the_groups_cannot_fit():
    shape, _ = model_shape(tiny_llama())
    with pytest.raises(BudgetExceededError, match="raise a budget"):
        plan_run(
            load_declared("paper-1aic"),
            {"dram": "64KiB", "cxl": "64KiB"},
            shape=shape,
            n_params=shape.n_params,
            batch=1,
            seq=64,
        )


def write_profile(path, *, cxl_slowdown: float):
    from profilers.machine_info import MachineInfo, Versions
    from profilers.machine_profile import MachineProfile, NodeProfile

    dram = NodeProfile(h2d_gib_per_s=50.0, d2h_gib_per_s=50.0, adamw_elements_per_s=9e9)
    cxl = NodeProfile(
        h2d_gib_per_s=50.0 / cxl_slowdown,
        d2h_gib_per_s=35.0 / cxl_slowdown,
        adamw_elements_per_s=2.4e9 / cxl_slowdown,
    )
    return MachineProfile(
        created_utc="2026-01-01T00:00:00Z",
        machine=MachineInfo("h", "cpu", 2, 2, 1 << 34),
        versions=Versions("3.11", "2.13", None, None, "0.1.0"),
        topology={},
        nodes={0: dram, 1: cxl},
    ).save(path)


def test_profile_rates_reach_the_planner(tmp_path):
    from offload.planning.model_shapes import MODELS

    shape = MODELS["llama-1.1b"]
    topo = load_declared("paper-1aic")
    budgets = {"dram": "8GiB", "cxl": "64GiB"}

    def predicted_total(slowdown: float) -> float:
        path = write_profile(tmp_path / f"profile-{slowdown}.json", cxl_slowdown=slowdown)
        run = plan_run(
            topo,
            budgets,
            shape=shape,
            n_params=shape.n_params,
            batch=1,
            seq=4096,
            profile=str(path),
        )
        assert run.profile == str(path)
        assert_within_budgets(run)
        return run.predicted_s["total"]

    # 8 GiB of DRAM cannot hold the 1.1B's groups, so a slower CXL card must cost time.
    assert predicted_total(10.0) > predicted_total(1.0)


def test_missing_profile_is_a_clear_error(topology, tmp_path):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="profile = .*not found.*offload-profile"):
        offload.enable(
            model, opt, policy="planned", budgets=BUDGETS, topology=topology, profile=str(missing)
        )
    # Planning fails before anything is installed.
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_invalid_profile_is_a_clear_error(topology, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not JSON.*offload-profile"):
        offload.enable(tiny_llama(), None, policy="planned", topology=topology, profile=bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"schema": "something else"}')
    with pytest.raises(ConfigError, match="profile = "):
        offload.enable(tiny_llama(), None, policy="planned", topology=topology, profile=wrong)


def test_plain_module_falls_back_to_cxl_aware_with_a_warning(topology):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="Sequential has no transformers `config`.*'cxl_aware'"):
        sess = offload.enable(model, opt, policy="planned", budgets=BUDGETS, topology=topology)
    with sess:
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert sess.plan is None and len(sess.report()) == 1


def test_other_policies_leave_no_plan(topology):
    model = nn.Linear(4, 4)
    with offload.enable(model, None, policy="local_only", topology=topology) as sess:
        assert sess.plan is None


def test_host_plans_size_what_this_runtime_allocates():
    """A 7B model with Adam at 32K tokens on a one-node 125 GiB machine: the paper's groups
    (20 B/param) do not fit a 110 GiB budget, the 14 B/param this runtime allocates do."""
    from offload.planning.host_groups import host_tensor_groups, runtime_tensor_groups
    from offload.planning.host_layout import plan_placements
    from offload.planning.model_shapes import MODELS

    shape = MODELS["qwen2.5-7b"]
    node = NumaNode(0, "dram", tuple(range(16)), 125 << 30, 120 << 30)
    machine = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="h100-like")
    sizes = dict(n_params=shape.n_params, hidden=shape.hidden, layers=shape.layers, tokens=32768)
    budget = {"dram": 110 << 30}
    paper = sum(g.nbytes for g in host_tensor_groups(shape.n_params, 1, 32768, shape.hidden, 28))
    ours = sum(g.nbytes for g in runtime_tensor_groups(shape.n_params, 1, 32768, shape.hidden, 28))
    assert paper > budget["dram"] > ours
    placements = plan_placements(machine, "cxl_aware", budget, **sizes)
    # The bf16 params updated on the host live in the gradient buffers: same placement.
    assert placements["params"] == placements["grads"] == placements["master_grads"]
    staged = runtime_tensor_groups(1000, 1, 8, 4, 2, grad_staging=True)
    assert staged[-1].nbytes == 2 * 2 * 1000
