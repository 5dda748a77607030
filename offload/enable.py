"""offload.enable(): the one call a training loop adds. It reads the config, the machine and the
plan, builds an OffloadSession and subscribes the tools that follow it (the run record, the
dashboard); it must not hold any offload logic of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from allocators import numa
from allocators.errors import OffloadError, PlacementError
from allocators.sysfs_topology import discover
from allocators.tiered import DEFAULT_BUDGETS
from allocators.topology import Topology
from offload.config import OffloadConfig, resolve_config
from offload.integrations.unwrap import inner_optimizer
from offload.planning.run_plan import run_placements
from offload.runtime.activation_offload import find_layers
from offload.runtime.host_memory import HostMemory
from offload.runtime.streams import CopyStreams
from offload.session import OffloadSession


class _NotGiven:
    """The default of enable()'s named settings: a setting left out is taken from the config
    file, OFFLOAD_* or OffloadConfig's defaults, while one passed, even equal to the default, wins.
    """

    def __repr__(self) -> str:
        return "<config, OFFLOAD_* or default>"


NOT_GIVEN: Any = _NotGiven()


def enable(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    activations: bool | str = NOT_GIVEN,
    optimizer_offload: bool = NOT_GIVEN,
    policy: str = NOT_GIVEN,
    budgets: dict[str, int | str] | None = NOT_GIVEN,
    config: OffloadConfig | str | Path | None = None,
    *,
    topology: Topology | None = None,
    **kwargs: Any,
) -> OffloadSession:
    """Offload ``model``'s activations and ``optimizer``'s state to host memory tiers.

    The training loop stays as it was (``loss.backward(); optimizer.step();
    optimizer.zero_grad()``): the optimizer object is patched in place and hooks do the rest.

    Args:
        model: an ``nn.Module`` (Hugging Face models included, with or without their own
            gradient checkpointing); its parameters' device is the device offloaded from.
        optimizer: the user's optimizer over ``model``'s parameters (None: activations only),
            bare or as a library wraps it (accelerate's ``AcceleratedOptimizer``, what a
            ``TrainerCallback`` receives, or any wrapper exposing ``.optimizer``): the inner
            optimizer is patched, so steps through the wrapper are offloaded too. ``model`` may
            be the one ``accelerator.prepare`` returned.
        activations: True (``"saved_tensors"``, the default), ``"checkpoint"`` (the paper's mode: keep only
            each decoder layer's input, on the host) or False.
        optimizer_offload: keep fp32 masters and optimizer state on the host, step there
            (default True).
        policy, budgets: where host buffers go (``local_only``, ``naive_interleave``,
            ``cxl_aware`` (the default), or ``planned``: the planner's shortest predicted step for micro-batches
            of ``plan_tokens`` tokens, with the rates of ``profile`` if given; the session's
            ``plan`` then holds its placements and predicted phase times) and how much each
            tier may hold, e.g. ``{"dram": "64GiB"}``.
        config: an OffloadConfig (taken whole) or a YAML file (default: the file OFFLOAD_CONFIG
            names). Each setting comes from the first of: the arguments passed here (one equal
            to its default still counts), ``config``, OFFLOAD_* environment variables
            (``OFFLOAD_POLICY=planned``, ``OFFLOAD_BUDGETS=dram=64GiB,cxl=256GiB``), the
            defaults. Other settings (``max_grad_norm``, ``grad_accumulation_steps``,
            ``bucket_nbytes``, ...) are keyword arguments too.
        topology: the machine (default: discovered from /sys).

    ``contention=`` (keyword, or ``contention:`` in YAML, or OFFLOAD_CONTENTION) says what the
    CPU optimizer's workers do while copies move data: ``"auto"`` (default) caps them at half
    the pool only where the machine profile (``profile``, else
    ``./offload-profile-<host>/profile.json``) measured real DMA slowed below 90% by the step,
    else off; ``"off"``; or the knobs, ``ContentionPolicy(threads_during_dma=2,
    duty_cycle_during_dma=0.5)`` or the same as a mapping (``"threads_during_dma=2"`` as text).
    It applies to the AdamW/Adam steps optim_cpu runs; ``sess.contention`` says what was chosen
    and why, and the report's ``optimizer_paced_ms``, ``optimizer_threads`` and
    ``optimizer_dma_threads`` what it did each step. Pacing changes no value, only when.

    Raises:
        ConfigError: a setting has a wrong value (the message says what to write).
        OffloadError: the optimizer cannot be offloaded (the message says what to use).
        PlacementError: the plan puts memory on a NUMA node this machine lacks (a declared
            topology's CXL card); BudgetExceededError: the budgets or a node's free memory
            cannot hold what is needed (the message has both numbers). Either way nothing is
            left allocated and the model and optimizer are as they were.

    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> with enable(model, opt, budgets={"dram": "1GiB"}) as sess:
    ...     model(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
    ...     len(sess.report())
    1
    """
    optimizer = inner_optimizer(optimizer)
    named = {
        "activations": activations,
        "optimizer_offload": optimizer_offload,
        "policy": policy,
        "budgets": budgets,
    }
    given = {name: value for name, value in named.items() if value is not NOT_GIVEN}
    settings = resolve_config(config, {**given, **kwargs})
    device = _device_of(model)
    topology = topology or discover()
    layers = find_layers(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or 1
    tier_budgets = settings.budgets or dict(DEFAULT_BUDGETS)
    placements, run_plan = run_placements(
        model,
        topology,
        settings.policy,
        tier_budgets,
        hidden=hidden,
        layers=max(len(layers) if layers is not None else 1, 1),
        tokens=settings.plan_tokens,
        profile=settings.profile,
        optimizer=_optimizer_kind(optimizer),
        grad_staging=settings.grad_accumulation_steps > 1,
        optimizer_offload=settings.optimizer_offload and optimizer is not None,
        # Without a stack of layers to checkpoint, "checkpoint" offloads every saved tensor.
        activations=(
            "saved_tensors"
            if settings.activations == "checkpoint" and layers is None
            else settings.activations
        ),
        activation_min_nbytes=settings.activation_min_nbytes,
        loss_chunk_tokens=settings.loss_chunk_tokens,
    )
    _check_nodes_exist(placements, topology)
    memory = HostMemory(topology, tier_budgets, placements)
    # The tools are imported here, not with offload: pandas and rich cost a second or more.
    from offload.tools.run_record import RunRecorder

    try:
        session = OffloadSession(
            model,
            optimizer,
            settings,
            memory,
            CopyStreams(device),
            layers=layers,
            plan=run_plan,
            run_log=RunRecorder(settings, run_plan, memory.allocator),
        )
    except BaseException:
        memory.close()
        raise
    if settings.dashboard:
        from offload.tools.dashboard_thread import DashboardThread

        try:
            DashboardThread(session, session.optimizer_offload).start()
        except BaseException:
            session.disable()
            raise
    return session


def _optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """How much fp32 state per parameter the host keeps: Lion one tensor, the others (Adam,
    AdamW, and optimizers sized like them) two."""
    return (
        "lion" if optimizer is not None and "lion" in type(optimizer).__name__.lower() else "adam"
    )


def _check_nodes_exist(placements: dict, topology: Topology) -> None:
    """Refuse, before any memory or hook, a plan that places on a node this machine lacks.

    A declared or hand-built topology can name nodes (a CXL card) that are not here; finding
    that out at the first buffer would leave half a session installed.
    """
    by_node: dict[int, list[str]] = {}
    for tensor_class, placement in placements.items():
        for node in getattr(placement, "nodes", ()):
            by_node.setdefault(node, []).append(tensor_class)
    try:
        numa.check_nodes(sorted(by_node))
    except PlacementError as exc:
        missing = [n for n in sorted(by_node) if n not in numa.online_nodes()]
        classes = sorted({c for n in missing for c in by_node[n]})
        raise PlacementError(
            f"{exc}. The plan for {topology.name or topology.source} puts {', '.join(classes)} "
            "there; nothing was allocated and the model was not changed. Leave topology unset "
            "to plan for this machine, or raise budget 'dram' so nothing spills to that node"
        ) from None


def _device_of(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()}
    if not devices:
        raise OffloadError(
            f"the model ({type(model).__name__}) has no parameters, so there is nothing to "
            "train or offload; pass the model whose parameters the optimizer updates"
        )
    if len(devices) != 1:
        raise OffloadError(
            f"the model's parameters are on {sorted(map(str, devices))}; "
            "offload.enable() needs a model on one device: call model.to('cuda') first"
        )
    return devices.pop()
