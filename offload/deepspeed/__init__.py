"""Tier-aware placement inside upstream DeepSpeed (0.19.x): ZeRO offload's host buffers from our
TieredAllocator, per rank. Importing it must not import DeepSpeed (that happens on first use).

``enable(model, optimizer, config, policy=..., budgets=...)`` calls deepspeed.initialize for you;
``DeepSpeedPlacement(allocator)`` is the hook itself, a context manager around your own call.
"""

from offload.deepspeed.activations import DeepSpeedActivations, offload_activations
from offload.deepspeed.call_sites import SUPPORTED_SERIES, check_version
from offload.deepspeed.engine import DeepSpeedRun, enable, pinned_offload_config
from offload.deepspeed.placement import DeepSpeedPlacement, PlacedBuffer
from offload.deepspeed.rank_plan import RankPlan, local_rank_and_size, plan_rank, split_budgets

__all__ = [
    "SUPPORTED_SERIES",
    "DeepSpeedActivations",
    "DeepSpeedPlacement",
    "DeepSpeedRun",
    "PlacedBuffer",
    "RankPlan",
    "check_version",
    "enable",
    "local_rank_and_size",
    "offload_activations",
    "pinned_offload_config",
    "plan_rank",
    "split_budgets",
]
