"""The planner at run time: what offload.enable(policy="planned") places host memory by, from the
model's shape, the machine's rates (a measured profile or declared ones) and the budgets.

It plans and records only; it must not allocate memory, time anything or change the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from allocators.placement import Placement
from allocators.tensor_classes import OptimizerName
from allocators.topology import Topology
from offload.config import OffloadConfig
from offload.planning.activation_bytes import DEFAULT_MIN_NBYTES, ActivationMode
from offload.planning.host_layout import DEFAULT_LAYOUT, HostLayout, plan_placements
from offload.planning.model_shapes import ModelShape, ModelShapeError, shape_from_config
from offload.planning.planner import Plan, plan, predicted_phases
from offload.planning.runtime_step import runtime_step
from offload.planning.simulator.rates import load_rates

if TYPE_CHECKING:
    import pandas as pd

# What "planned" falls back to when the model's shape is unknown: the paper's policy.
FALLBACK_POLICY = "cxl_aware"


@dataclass(frozen=True)
class RunPlan:
    """The plan a session runs with: placement per host item and predicted phase times.

    ``batch`` and ``seq`` are the micro-batch it was planned for; ``rate_notes`` lists the rates
    that came from the paper rather than from ``profile`` or the topology.
    """

    plan: Plan
    shape: ModelShape
    batch: int
    seq: int
    profile: str | None
    rate_notes: tuple[str, ...]

    @property
    def placements(self) -> dict[str, Placement]:
        """Placement per host item, e.g. ``{"momentum": node0:1, "variance": node0:0.6 + node1:0.4}``."""
        return dict(self.plan.placements)

    @property
    def predicted_s(self) -> dict[str, float]:
        """Predicted seconds of forward, backward, step, overhead and total."""
        return dict(predicted_phases(self.plan.prediction))

    def by_class(self) -> dict:
        """Placement per tensor class, as the allocator takes it."""
        return self.plan.result.by_class()

    def table(self) -> pd.DataFrame:
        """One row per item, in the order they were placed: the paper's group it belongs to,
        bytes, rule, placement and bytes per node."""
        # Imported here: planning draws nothing, and pandas costs a second to import.
        import pandas as pd

        return pd.DataFrame.from_records(
            {
                "item": item.group.name,
                "group": item.group.group_name,
                "nbytes": item.group.nbytes,
                "rule": item.rule,
                "placement": str(item.placement),
                "nbytes_per_node": dict(item.nbytes_per_node),
            }
            for item in self.plan.result.groups
        )


def model_shape(model: nn.Module) -> tuple[ModelShape | None, str]:
    """The model's decoder shape from its transformers ``config``, or None and the reason.

    >>> model_shape(nn.Linear(2, 2))
    (None, 'Linear has no transformers `config` to read its layers and sizes from')
    """
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if to_dict is None:
        name = type(model).__name__
        return None, f"{name} has no transformers `config` to read its layers and sizes from"
    try:
        return shape_from_config(to_dict(), name=type(model).__name__), ""
    except ModelShapeError as exc:
        return None, str(exc)


def plan_run(
    topology: Topology,
    budgets: Mapping[str, int | str],
    *,
    shape: ModelShape,
    n_params: int,
    batch: int,
    seq: int,
    profile: str | None = None,
    layout: HostLayout = DEFAULT_LAYOUT,
) -> RunPlan:
    """Plan host memory with the ``planned`` policy for ``n_params`` of ``shape`` at ``batch`` x ``seq``.

    The groups are those this runtime allocates for ``layout`` (activations sized for its mode
    from ``shape``), and the step is the one it runs (offload.planning.runtime_step, for ``layout``'s
    optimizer and gradient dtype).
    Raises BudgetExceededError when the groups do not fit the budgets.

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.model_shapes import MODELS
    >>> shape = MODELS["llama-1.1b"]
    >>> run = plan_run(load_declared("paper-1aic"), {"dram": "16GiB", "cxl": "64GiB"},
    ...                shape=shape, n_params=shape.n_params, batch=1, seq=4096)
    >>> run.plan.policy, sorted(run.placements)[0], run.predicted_s["total"] > 0
    ('planned', 'activation_checkpoints', True)
    """
    rates = load_rates(topology, profile)
    groups = layout.groups(n_params, batch, seq, shape.hidden, shape.layers, shape=shape)
    settings = OffloadConfig(
        activations=layout.activations,
        activation_min_nbytes=layout.activation_min_nbytes,
        loss_chunk_tokens=layout.loss_chunk_tokens,
    )
    config = runtime_step(
        settings,
        param_nbytes=4 if layout.grad_nbytes_per_param == 4 else 2,
        optimizer=layout.optimizer,
    )
    chosen = plan(
        groups,
        topology.tiers,
        budgets,
        "planned",
        shape=shape,
        batch=batch,
        seq=seq,
        rates=rates,
        config=config,
    )
    return RunPlan(chosen, shape, batch, seq, profile, tuple(rates.notes))


def run_placements(
    model: nn.Module,
    topology: Topology,
    policy: str,
    budgets: Mapping[str, int | str],
    *,
    hidden: int,
    layers: int,
    tokens: int,
    profile: str | None = None,
    optimizer: OptimizerName = "adam",
    grad_staging: bool = False,
    optimizer_offload: bool = True,
    activations: ActivationMode = "saved_tensors",
    activation_min_nbytes: int = DEFAULT_MIN_NBYTES,
    loss_chunk_tokens: int | None = None,
) -> tuple[dict, RunPlan | None]:
    """Placement per tensor class for ``model`` under ``policy``, and the plan behind it.

    ``planned`` plans for micro-batches of ``tokens`` tokens (one sequence of that length) and
    returns its RunPlan. The paper's policies need only sizes (``hidden``, ``layers``) and return
    no plan. A model without a usable transformers config cannot be simulated: ``cxl_aware``
    places it instead, with a warning that says why, and the plan is None. The sizes are those
    this runtime allocates: gradients in the params' dtype, a staging copy with accumulation
    (``grad_staging``), optimizer state for ``optimizer``; nothing but activations when
    ``optimizer_offload`` is off; the activations ``activations`` mode offloads (saves of at
    least ``activation_min_nbytes``, the loss in chunks of ``loss_chunk_tokens``), sized from
    the model's transformers config (without one: one layer input per layer).

    >>> import warnings
    >>> from allocators.declared_topology import load_declared
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     by_class, run = run_placements(nn.Linear(4, 4), load_declared("paper-1aic"),
    ...                                    "planned", {"dram": "1GiB"}, hidden=4, layers=1,
    ...                                    tokens=16)
    >>> run is None, "'cxl_aware' instead" in str(caught[0].message)
    (True, True)
    """
    trainable = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    n_params = max(sum(p.numel() for p in trainable), 1)
    layout = HostLayout(
        optimizer=optimizer,
        grad_nbytes_per_param=max((p.element_size() for p in trainable), default=4),
        grad_staging=grad_staging,
        optimizer_offload=optimizer_offload,
        activations=activations,
        activation_min_nbytes=activation_min_nbytes,
        loss_chunk_tokens=loss_chunk_tokens,
    )
    shape, reason = model_shape(model)
    sizes = {"n_params": n_params, "hidden": hidden, "layers": layers, "tokens": tokens}
    if policy != "planned":
        return plan_placements(topology, policy, budgets, **sizes, layout=layout, shape=shape), None
    if shape is None:
        warnings.warn(
            f"policy='planned' needs the model's shape to predict the step, but {reason}; "
            f"placing host memory with {FALLBACK_POLICY!r} instead. Use a transformers model "
            f"or pass policy={FALLBACK_POLICY!r}",
            UserWarning,
            stacklevel=3,
        )
        return plan_placements(topology, FALLBACK_POLICY, budgets, **sizes, layout=layout), None
    run = plan_run(
        topology,
        budgets,
        shape=shape,
        n_params=n_params,
        batch=1,
        seq=tokens,
        profile=profile,
        layout=layout,
    )
    return run.by_class(), run
