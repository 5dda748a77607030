"""policy="planned" per DeepSpeed rank: the planner's placement for the rank's ZeRO partition,
within its share of the budgets, on the tiers of its GPU. Plans only: no DeepSpeed, no memory.
"""

from __future__ import annotations

import pytest
from two_sockets import two_sockets_two_cxl

from allocators.declared_topology import load_declared
from allocators.errors import ConfigError
from allocators.policies import get_policy
from allocators.topology import NumaNode, Topology
from offload.deepspeed.rank_plan import plan_rank
from offload.deepspeed.rank_planner import deepspeed_step
from offload.planning.host_groups import host_tensor_groups
from offload.planning.model_shapes import MODELS
from offload.planning.simulator.rates import sim_rates
from offload.planning.simulator.step import simulate_step

GIB = 1 << 30
SHAPE = MODELS["llama-1.1b"]
TOKENS = 4096
ZERO2 = deepspeed_step({"zero_optimization": {"stage": 2}}, "checkpoint")


def two_sockets_one_cxl_each() -> Topology:
    """paper-1aic twice: sockets 0 and 1 with a GPU each, CXL 2 near socket 0, CXL 3 near 1."""
    dram, card = load_declared("paper-1aic").nodes[:2]
    return two_sockets_two_cxl(dram, card, (dram.cpus, (32,)), "two paper-1aic sockets")


def rank_plan(topology, budgets, *, dp_world_size, local_rank=0, local_world_size=1):
    return plan_rank(
        topology,
        "planned",
        budgets,
        n_params=SHAPE.n_params,
        hidden=SHAPE.hidden,
        layers=SHAPE.layers,
        tokens=TOKENS,
        dp_world_size=dp_world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        shape=SHAPE,
        step=ZERO2,
    )


def test_planned_plans_the_ranks_share_of_the_partitions_within_its_budget():
    budgets = {"dram": "16GiB", "cxl": "64GiB"}
    plan = rank_plan(load_declared("paper-1aic"), budgets, dp_world_size=4, local_world_size=2)
    groups = {item.group.name: item for item in plan.planner.result.groups}
    partition = -(-SHAPE.n_params // 4)
    for name in ("momentum", "variance", "master_grads", "master_params"):
        assert groups[name].group.nbytes == 4 * partition
    assert groups["compute_params"].group.nbytes == 2 * partition
    assert plan.budgets_nbytes == {"dram": 8 * GIB, "cxl": {1: 32 * GIB}}
    charged: dict[int, int] = {}
    for item in groups.values():
        for node, nbytes in item.nbytes_per_node.items():
            charged[node] = charged.get(node, 0) + nbytes
    assert charged[0] <= 8 * GIB and charged.get(1, 0) <= 32 * GIB
    assert set(plan.placements) >= {"optimizer_state", "master_params", "grads", "activations"}
    assert plan.predicted_step_s is not None and plan.predicted_step_s > 0


def test_planned_per_rank_is_never_slower_than_cxl_aware_for_that_rank():
    # A DRAM share too small for the CPU-touched state: some of it must go to CXL.
    topology = load_declared("paper-1aic")
    budgets = {"dram": "4GiB", "cxl": "64GiB"}
    planned = rank_plan(topology, budgets, dp_world_size=2)
    groups = host_tensor_groups(-(-SHAPE.n_params // 2), 1, TOKENS, SHAPE.hidden, SHAPE.layers)
    paper = get_policy("cxl_aware")(groups, topology.tiers, planned.budgets_nbytes).by_class()
    rates = sim_rates(topology)

    def rank_step_s(placements) -> float:
        # The rank's step: the whole model at 2 micro-batches, halved (see rank_planner).
        return simulate_step(SHAPE, 2, TOKENS, placements, rates, ZERO2).total_s / 2

    assert planned.predicted_step_s == pytest.approx(rank_step_s(planned.placements))
    assert planned.predicted_step_s <= rank_step_s(paper) * (1 + 1e-9)
    assert 1 in planned.placements["optimizer_state"].nodes + planned.placements["grads"].nodes


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_plans_over_its_own_sockets_dram_and_nearest_cxl(rank):
    plan = rank_plan(
        two_sockets_one_cxl_each(),
        {"dram": "8GiB", "cxl": "64GiB"},
        dp_world_size=2,
        local_rank=rank,
        local_world_size=2,
    )
    used = {node for placement in plan.placements.values() for node in placement.nodes}
    # Its own socket's DRAM and its nearest card, both used (which items go where is the
    # planner's choice, item by item).
    assert used == {rank, rank + 2}
    assert plan.budgets_nbytes["cxl"] == {rank + 2: 32 * GIB}


def test_planned_without_the_models_shape_is_refused_with_what_to_pass():
    with pytest.raises(ConfigError, match="shape="):
        plan_rank(
            load_declared("paper-1aic"),
            "planned",
            {"dram": "64GiB"},
            n_params=1000,
            hidden=8,
            layers=1,
            tokens=16,
        )


def test_the_step_follows_the_deepspeed_config():
    zero3 = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert deepspeed_step(zero3).offload_params
    assert not deepspeed_step(zero3).offload_activations
    assert not deepspeed_step({"zero_optimization": {"stage": 3}}).offload_params


def test_a_single_node_machine_plans_everything_on_its_dram():
    node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=64 * GIB, free_bytes=64 * GIB)
    topology = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="one node")
    plan = rank_plan(topology, {"dram": "32GiB"}, dp_world_size=2, local_world_size=2)
    assert {p.nodes for p in plan.placements.values()} == {(0,)}
