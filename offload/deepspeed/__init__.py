"""Tier-aware placement inside upstream DeepSpeed (0.19.x): ZeRO offload's host buffers from our
TieredAllocator, per rank. Importing it must not import DeepSpeed (that happens on first use).

``enable(model, optimizer, config, policy=..., budgets=...)`` calls deepspeed.initialize for you
(policy: local_only, naive_interleave, cxl_aware or planned, per rank); ``DeepSpeedPlacement
(allocator)`` is the hook itself, a context manager around your own call.
"""

from offload.deepspeed.activations import DeepSpeedActivations, offload_activations
from offload.deepspeed.buffer_placement import (
    BuffersInUseWarning,
    DeepSpeedPlacement,
    PlacedBuffer,
    UnplacedBuffer,
)
from offload.deepspeed.call_sites import SUPPORTED_SERIES, check_version
from offload.deepspeed.engine import DeepSpeedRun, enable, pinned_offload_config
from offload.deepspeed.rank_plan import RankPlan, local_rank_and_size, plan_rank, split_budgets
from offload.deepspeed.rank_planner import RankPrediction, deepspeed_step, plan_rank_step
from offload.deepspeed.release import ForgottenReferences, forget_engine

__all__ = [
    "SUPPORTED_SERIES",
    "BuffersInUseWarning",
    "DeepSpeedActivations",
    "DeepSpeedPlacement",
    "DeepSpeedRun",
    "ForgottenReferences",
    "PlacedBuffer",
    "RankPlan",
    "RankPrediction",
    "UnplacedBuffer",
    "check_version",
    "deepspeed_step",
    "enable",
    "forget_engine",
    "local_rank_and_size",
    "offload_activations",
    "pinned_offload_config",
    "plan_rank",
    "plan_rank_step",
    "split_budgets",
]
