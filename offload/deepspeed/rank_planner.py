"""``policy="planned"`` for one DeepSpeed rank: offload.planning.planner's shortest predicted step for this
rank's ZeRO partition over the tiers seen from its GPU. It plans only; it must not allocate.

The simulator predicts one GPU holding the whole model. A ZeRO-2/3 rank of ``W`` holds 1/W of the
parameter-sized host traffic (its partitions of weights, gradients, master copy and optimizer
state) but all of its own micro-batch's activations and compute. Every phase time is a sum of
bytes / rate and flops / rate, so the rank's step is exactly 1/W of the whole model's step at
``W`` times the micro-batch: the same placement minimises both, and the planner's public
``plan`` is asked that question with this rank's (1/W-sized) groups charged to its budgets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from allocators.placement import Placement
from allocators.tensor_classes import TensorGroup
from allocators.topology import Tiers
from offload.planning.model_shapes import ModelShape
from offload.planning.planner import Plan, plan
from offload.planning.simulator.rates import SimRates
from offload.planning.simulator.step import DEEPSPEED_ZERO3, StepConfig


@dataclass(frozen=True)
class RankPrediction:
    """The planner's choice for one rank and its predicted step, in this rank's own seconds."""

    plan: Plan
    dp_world_size: int

    @property
    def placements(self) -> dict[str, Placement]:
        """Placement per tensor class, as the allocator takes it."""
        return dict(self.plan.result.by_class())

    @property
    def predicted_step_s(self) -> float:
        """Seconds of one step of this rank (the whole-model prediction at W micro-batches / W)."""
        return self.plan.prediction.total_s / self.dp_world_size


def plan_rank_step(
    groups: tuple[TensorGroup, ...],
    tiers: Tiers,
    budgets: Mapping[str, int | dict[int, int]],
    *,
    shape: ModelShape,
    tokens: int,
    rates: SimRates,
    dp_world_size: int = 1,
    step: StepConfig = DEEPSPEED_ZERO3,
) -> RankPrediction:
    """The ``planned`` placement of one rank's ``groups`` (already 1/``dp_world_size`` sized).

    ``shape`` is the whole model (every rank computes all of it); ``tokens`` its micro-batch.

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.host_groups import host_tensor_groups
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import sim_rates
    >>> topo = load_declared("paper-1aic"); shape = MODELS["llama-1.1b"]
    >>> groups = host_tensor_groups(shape.n_params // 2, 1, 4096, shape.hidden, shape.layers)
    >>> rank = plan_rank_step(groups, topo.tiers, {"dram": "8GiB", "cxl": "32GiB"}, shape=shape,
    ...                       tokens=4096, rates=sim_rates(topo), dp_world_size=2)
    >>> rank.plan.policy, rank.predicted_step_s > 0
    ('planned', True)
    """
    chosen = plan(
        groups,
        tiers,
        budgets,
        "planned",
        shape=shape,
        batch=dp_world_size,
        seq=tokens,
        rates=rates,
        config=step,
    )
    return RankPrediction(chosen, dp_world_size)


def deepspeed_step(config: Mapping[str, Any], activations: str = "off") -> StepConfig:
    """The simulator's step for a DeepSpeed config: ZeRO-3 with ``offload_param`` to ``cpu``
    streams bf16 weights from the host, other stages keep them on the GPU; ``activations`` is
    offload.deepspeed's mode (``checkpoint`` recomputes layers from offloaded inputs).

    >>> step = deepspeed_step({"zero_optimization": {"stage": 2}}, "checkpoint")
    >>> step.offload_params, step.offload_activations, step.recompute
    (False, True, True)
    """
    zero = config.get("zero_optimization", {}) or {}
    offload_param = zero.get("offload_param") or {}
    streams_params = zero.get("stage") == 3 and offload_param.get("device") == "cpu"
    return replace(
        DEEPSPEED_ZERO3,
        offload_params=bool(streams_params),
        offload_activations=activations != "off",
        recompute=activations == "checkpoint",
    )
