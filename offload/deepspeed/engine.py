"""offload.deepspeed.enable: deepspeed.initialize with this rank's host buffers placed by our plan.
It plans, hooks and initializes; it must not change the DeepSpeed config beyond pinning offloads.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from allocators.errors import ConfigError
from allocators.tiered import DEFAULT_BUDGETS, TieredAllocator
from allocators.topology import Topology
from offload.deepspeed.activations import (
    ActivationMode,
    DeepSpeedActivations,
    offload_activations,
)
from offload.deepspeed.buffer_placement import DeepSpeedPlacement
from offload.deepspeed.call_sites import check_version
from offload.deepspeed.rank_plan import RankPlan, local_rank_and_size, plan_rank
from offload.deepspeed.rank_planner import deepspeed_step
from offload.deepspeed.release import forget_engine
from offload.planning.model_shapes import ModelShape

# What "planned" falls back to when the model's shape is unknown (as offload.enable does).
FALLBACK_POLICY = "cxl_aware"


@dataclass
class DeepSpeedRun:
    """What deepspeed.initialize returned, plus our placement (usage, close) and the rank's plan."""

    engine: Any
    optimizer: Any
    dataloader: Any
    lr_scheduler: Any
    placement: DeepSpeedPlacement
    plan: RankPlan
    activations: DeepSpeedActivations | None = None

    def close(self) -> None:
        """Destroy the engine, take our hooks off, drop DeepSpeed's references to the engine and
        give every host buffer back.

        DeepSpeed 0.19 keeps a destroyed engine alive through module-level state, the model and
        its last outputs; :func:`offload.deepspeed.release.forget_engine` and the placement's
        close() drop those references. Buffers whose tensors are still held elsewhere (under
        ZeRO-3 the model's parameters; the engine, its optimizer or a tensor of theirs) stay
        mapped with a BuffersInUseWarning; ``run.placement.close()`` finishes once they are
        dropped.
        """
        if self.activations is not None:
            self.activations.remove()
        engine = self.engine
        if engine is not None:
            engine.destroy()  # attached: its unpins of our buffers come to us
            self.placement.detach()
            forget_engine(engine)
        # The model's ZeRO hooks keep the optimizer (and its buffers) alive as long as the model.
        self.engine = self.optimizer = self.dataloader = self.lr_scheduler = None
        self.activations = None
        del engine
        gc.collect()
        self.placement.close()


def pinned_offload_config(config: Mapping[str, Any] | str) -> dict[str, Any]:
    """A copy of a DeepSpeed config (dict or JSON path) with ``pin_memory`` on for each offload.

    Our buffers are handed to DeepSpeed where it pins, so an offload that does not pin would
    stay in DeepSpeed's own unplaced memory.

    >>> cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    >>> pinned_offload_config(cfg)["zero_optimization"]["offload_optimizer"]
    {'device': 'cpu', 'pin_memory': True}
    >>> cfg["zero_optimization"]["offload_optimizer"]
    {'device': 'cpu'}
    """
    if isinstance(config, str | os.PathLike):
        with open(config) as handle:
            config = json.load(handle)
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config = {type(config).__name__} is not a DeepSpeed config; pass a dict or the "
            "path of a JSON file"
        )
    result = copy.deepcopy(dict(config))
    zero = result.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        if isinstance(offload, dict) and offload.get("device", "none") == "cpu":
            offload["pin_memory"] = True
    return result


def _model_sizes(model: nn.Module) -> tuple[int, ModelShape | None, str]:
    from offload.planning.run_plan import model_shape

    n_params = max(sum(p.numel() for p in model.parameters()), 1)
    shape, reason = model_shape(model)
    return n_params, shape, reason


def enable(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    config: Mapping[str, Any] | str | None = None,
    *,
    policy: str = "cxl_aware",
    budgets: Mapping[str, Any] | None = None,
    topology: Topology | None = None,
    tokens: int = 4096,
    activations: ActivationMode = "off",
    activation_min_nbytes: int = 1 << 20,
    profile: str | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    **initialize_kwargs: Any,
) -> DeepSpeedRun:
    """Call deepspeed.initialize with ZeRO offload's host buffers placed for this rank.

    Args:
        model, optimizer, config: as for ``deepspeed.initialize`` (config: dict or JSON path);
            offloads to ``cpu`` are made to pin, so their buffers pass through our allocator.
        policy: ``local_only``, ``naive_interleave``, ``cxl_aware`` (allocators.policies) or
            ``planned``: offload.planning.planner's shortest predicted step for this rank's partition
            (a transformers model is needed to simulate it; other models get ``cxl_aware``
            with a warning).
        budgets: host bytes per tier for the whole machine, e.g. ``{"dram": "512GiB",
            "cxl": "1TiB"}``; each rank gets 1/``local_world_size`` of every tier.
        topology: the machine (default: discovered from /sys); tiers are seen from GPU
            ``local_rank``, so each rank places on the NUMA node and CXL devices nearest its GPU.
        tokens: tokens per micro-batch, to size activations in the plan.
        activations: ``checkpoint`` (each decoder layer checkpointed, its input offloaded),
            ``all`` (every saved tensor of ``activation_min_nbytes`` or more) or ``off``;
            offloaded activations share this rank's allocator and budgets.
        profile: ``planned`` only: a measured ``offload-profile`` JSON whose rates win over
            the topology's declared ones.
        local_rank, local_world_size: default from LOCAL_RANK and LOCAL_SIZE (or
            LOCAL_WORLD_SIZE), as the deepspeed launcher and torchrun set them.

    Raises ConfigError for an unsupported DeepSpeed (0.19.x only) or a bad setting, and
    BudgetExceededError when this rank's share of the budgets cannot hold its partitions.

    >>> run = enable(model, config=ds_config, policy="cxl_aware",  # doctest: +SKIP
    ...              budgets={"dram": "256GiB", "cxl": "512GiB"})
    >>> loss = run.engine(batch); run.engine.backward(loss); run.engine.step()  # doctest: +SKIP
    >>> run.placement.allocator.usage_frame()  # doctest: +SKIP
    """
    import deepspeed

    check_version(deepspeed.__version__)
    if config is None:
        raise ConfigError("config is missing; pass the DeepSpeed config dict or JSON path")
    env_rank, env_size = local_rank_and_size()
    rank = env_rank if local_rank is None else local_rank
    size = env_size if local_world_size is None else local_world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dp_world_size = torch.distributed.get_world_size()
    else:
        dp_world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if topology is None:
        from allocators.sysfs_topology import discover

        topology = discover()
    if profile is not None and policy != "planned":
        raise ConfigError(
            f"profile is read only by policy='planned' (policy is {policy!r}); set "
            "policy='planned' or drop profile"
        )
    n_params, shape, reason = _model_sizes(model)
    if policy == "planned" and shape is None:
        warnings.warn(
            f"policy='planned' needs the model's shape to predict the step, but {reason}; "
            f"placing host memory with {FALLBACK_POLICY!r} instead. Use a transformers model "
            f"or pass policy={FALLBACK_POLICY!r}",
            UserWarning,
            stacklevel=2,
        )
        policy = FALLBACK_POLICY
    ds_config = pinned_offload_config(config)
    rates = None
    if policy == "planned":
        from offload.planning.simulator.rates import load_rates

        rates = load_rates(topology, profile)
    plan = plan_rank(
        topology,
        policy,
        dict(budgets or DEFAULT_BUDGETS),
        n_params=n_params,
        hidden=shape.hidden if shape is not None else 1,
        layers=shape.layers if shape is not None else 1,
        tokens=tokens,
        dp_world_size=dp_world_size,
        local_rank=rank,
        local_world_size=size,
        shape=shape,
        rates=rates,
        step=deepspeed_step(ds_config, activations),
    )
    allocator = TieredAllocator(
        topology,
        plan.budgets_nbytes,
        plan.placements,
        pin=torch.cuda.is_available(),
        gpu_index=rank,
    )
    placement = DeepSpeedPlacement(allocator)
    try:
        with placement:
            engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                config=ds_config,
                **initialize_kwargs,
            )
        placement.adopt_optimizer_states(engine.optimizer)
        placement.attach(engine)
        hooks = None
        if activations != "off":
            hooks = offload_activations(
                engine, allocator, activations, min_nbytes=activation_min_nbytes
            )
    except BaseException:
        placement.detach()
        allocator.close()
        raise
    return DeepSpeedRun(engine, ds_optimizer, dataloader, scheduler, placement, plan, hooks)
