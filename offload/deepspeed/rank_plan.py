"""One DeepSpeed rank's share of host memory: its GPU's local NUMA node, its slice of each tier's
budget (split between the ranks of its machine) and a placement per tensor class. Plans only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from allocators.errors import ConfigError
from allocators.placement import Placement
from allocators.policies import POLICY_NAMES, get_policy
from allocators.topology import Topology
from allocators.units import parse_size
from offload.deepspeed.rank_planner import plan_rank_step
from offload.planning.host_groups import host_tensor_groups
from offload.planning.model_shapes import ModelShape
from offload.planning.planner import Plan
from offload.planning.simulator.rates import SimRates, sim_rates
from offload.planning.simulator.step import DEEPSPEED_ZERO3, StepConfig


@dataclass(frozen=True)
class RankPlan:
    """Where one rank's offloaded buffers go: nodes seen from its GPU, and its budgets in bytes.

    ``planner`` and ``predicted_step_s`` (this rank's step, seconds) are set by ``planned`` only.
    """

    local_rank: int
    local_world_size: int
    policy: str
    budgets_nbytes: dict[str, int | dict[int, int]]
    placements: dict[str, Placement]
    planner: Plan | None = None
    predicted_step_s: float | None = None


def local_rank_and_size(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's rank on its machine and the number of ranks there, from the launcher's env.

    The DeepSpeed launcher sets LOCAL_RANK and LOCAL_SIZE; torchrun sets LOCAL_WORLD_SIZE.

    >>> local_rank_and_size({"LOCAL_RANK": "1", "LOCAL_SIZE": "4"})
    (1, 4)
    >>> local_rank_and_size({})
    (0, 1)
    """
    env = os.environ if env is None else env
    try:
        rank = int(env.get("LOCAL_RANK", "0"))
        size = int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError as exc:
        raise ConfigError(
            f"LOCAL_RANK/LOCAL_SIZE must be integers ({exc}); launch with the deepspeed launcher "
            "or torchrun, or pass local_rank= and local_world_size="
        ) from exc
    if not 0 <= rank < max(size, 1):
        raise ConfigError(
            f"LOCAL_RANK={rank} is not below the {size} ranks on this machine; set LOCAL_SIZE "
            "(or LOCAL_WORLD_SIZE) to the number of processes started on it"
        )
    return rank, max(size, 1)


def split_budgets(
    budgets: Mapping[str, int | str | Mapping[int, int | str]], n_ranks: int
) -> dict[str, int | dict[int, int]]:
    """Each tier's budget (or each CXL node's) divided evenly between ``n_ranks`` ranks, in bytes.

    >>> split_budgets({"dram": "64GiB", "cxl": {1: "16GiB"}}, 4)
    {'dram': 17179869184, 'cxl': {1: 4294967296}}
    """
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 1:
        raise ConfigError(f"n_ranks = {n_ranks!r} must be a positive int (ranks on this machine)")

    def share(value: int | str) -> int:
        return parse_size(value, what="budget") // n_ranks

    return {
        tier: {int(node): share(v) for node, v in value.items()}
        if isinstance(value, Mapping)
        else share(value)
        for tier, value in budgets.items()
    }


def nearest_cxl(topology: Topology, gpu_index: int = 0) -> tuple[int, ...]:
    """The CXL nodes at the smallest distance from GPU ``gpu_index``'s NUMA node.

    >>> from allocators.declared_topology import load_declared
    >>> nearest_cxl(load_declared("paper-2aic"))
    (1, 2)
    """
    anchor = topology.anchor_node(gpu_index)
    cxl = [n.id for n in topology.nodes if n.kind == "cxl"]
    nearest = min((topology.distance(anchor, node) for node in cxl), default=None)
    return tuple(node for node in cxl if topology.distance(anchor, node) == nearest)


def plan_rank(
    topology: Topology,
    policy: str,
    budgets: Mapping[str, int | str | Mapping[int, int | str]],
    *,
    n_params: int,
    hidden: int,
    layers: int,
    tokens: int,
    dp_world_size: int = 1,
    local_rank: int = 0,
    local_world_size: int = 1,
    shape: ModelShape | None = None,
    rates: SimRates | None = None,
    step: StepConfig = DEEPSPEED_ZERO3,
) -> RankPlan:
    """Placement per tensor class for one rank holding 1/``dp_world_size`` of the ZeRO partitions.

    The rank sees the tiers from its GPU (``local_rank``): local DRAM is its socket's node and
    CXL is the devices nearest it (or the nodes a per-node ``cxl`` budget names). Every budget is
    split evenly between the ``local_world_size`` ranks of the machine.

    ``policy="planned"`` asks offload.planning.planner for this rank's shortest predicted step; it needs
    the whole model's ``shape`` and takes ``rates`` (default: the topology's declared rates,
    offload.planning.simulator.rates.sim_rates) and the ``step`` being run (ZeRO-2 keeps parameters on
    the GPU: ``StepConfig(offload_params=False, ...)``). It assumes the rank has its nodes'
    bandwidth to itself (ranks sharing a node slow every placement there alike).

    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> plan = plan_rank(topo, "cxl_aware", {"dram": "2GiB"}, n_params=1000, hidden=8, layers=2,
    ...                  tokens=16, dp_world_size=2, local_world_size=2)
    >>> plan.budgets_nbytes, plan.placements["master_params"].nodes
    ({'dram': 1073741824}, (0,))
    """
    if policy not in POLICY_NAMES:
        raise ConfigError(
            f"policy {policy!r} is not available per DeepSpeed rank; write one of "
            f"{', '.join(POLICY_NAMES)}"
        )
    # The paper's policies need sizes only; "planned" also simulates the rank's step.
    if policy == "planned" and shape is None:
        raise ConfigError(
            "policy='planned' simulates the rank's step and needs the model's shape: pass "
            "shape= (offload.planning.model_shapes.shape_from_config(model.config.to_dict())), or "
            "write policy='cxl_aware'"
        )
    if dp_world_size < 1:
        raise ConfigError(f"dp_world_size = {dp_world_size!r} must be at least 1")
    rank_budgets = split_budgets(budgets, local_world_size)
    tiers = topology.tiers_for(local_rank)
    cxl_budget = rank_budgets.get("cxl")
    if isinstance(cxl_budget, dict):
        cxl_nodes = tuple(cxl_budget)
    else:
        cxl_nodes = nearest_cxl(topology, local_rank)
        if cxl_budget is not None and cxl_nodes:
            # Named per node, so the allocator charges only the devices this rank plans on.
            rank_budgets["cxl"] = {node: cxl_budget // len(cxl_nodes) for node in cxl_nodes}
    tiers = replace(tiers, cxl=tuple(n for n in tiers.cxl if n.id in cxl_nodes))
    groups = host_tensor_groups(-(-n_params // dp_world_size), 1, tokens, hidden, layers)
    if policy != "planned":
        placements = get_policy(policy)(groups, tiers, rank_budgets).by_class()
        return RankPlan(local_rank, local_world_size, policy, rank_budgets, dict(placements))
    predicted = plan_rank_step(
        groups,
        tiers,
        rank_budgets,
        shape=shape,
        tokens=tokens,
        rates=sim_rates(topology) if rates is None else rates,
        dp_world_size=dp_world_size,
        step=step,
    )
    return RankPlan(
        local_rank,
        local_world_size,
        policy,
        rank_budgets,
        predicted.placements,
        predicted.plan,
        predicted.predicted_step_s,
    )
