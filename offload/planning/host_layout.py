"""What offload.enable() keeps on the host for a run (HostLayout) and where a policy puts it
(plan_placements): sizes and placements only; runtime.host_memory allocates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from allocators.policies import get_policy
from allocators.tensor_classes import OptimizerName, TensorGroup
from allocators.topology import Topology
from offload.planning.activation_bytes import (
    DEFAULT_MIN_NBYTES,
    ActivationEstimate,
    ActivationMode,
    estimate_activations,
)
from offload.planning.host_groups import runtime_tensor_groups
from offload.planning.model_shapes import ModelShape


@dataclass(frozen=True)
class HostLayout:
    """What offload.enable() keeps on the host for a run, as runtime_tensor_groups sizes it:
    optimizer state for ``optimizer``, gradients of ``grad_nbytes_per_param`` (the params'
    dtype, also the activations'), a staging copy with ``grad_staging``, nothing but
    activations without ``optimizer_offload``, and the activations of mode ``activations``
    (saves of at least ``activation_min_nbytes``; the loss in chunks of ``loss_chunk_tokens``).

    >>> [g.name for g in HostLayout(optimizer_offload=False).groups(1000, 1, 8, 4, 2)]
    ['activation_checkpoints']
    """

    optimizer: OptimizerName = "adam"
    grad_nbytes_per_param: int = 2
    grad_staging: bool = False
    optimizer_offload: bool = True
    activations: ActivationMode = "saved_tensors"
    activation_min_nbytes: int = DEFAULT_MIN_NBYTES
    loss_chunk_tokens: int | None = None

    def groups(
        self,
        n_params: int,
        batch: int,
        seq: int,
        hidden: int,
        layers: int,
        *,
        shape: ModelShape | None = None,
    ) -> tuple[TensorGroup, ...]:
        """The host tensor groups of this layout for a model and micro-batch.

        With the decoder's ``shape`` the activations group holds what this layout's mode saves
        (offload.planning.activation_bytes); without them, the paper's one bf16 layer input per layer,
        all a model of unknown shape can be sized by.

        >>> shape = ModelShape("tiny", 2, 64, 128, 4, 2, 16, 100)
        >>> full = HostLayout(activation_min_nbytes=0).groups(1000, 1, 8, 64, 2, shape=shape)
        >>> ckpt = HostLayout(activations="checkpoint", activation_min_nbytes=0).groups(
        ...     1000, 1, 8, 64, 2, shape=shape)
        >>> full[-2].name, full[-2].nbytes > ckpt[-2].nbytes
        ('activation_checkpoints', True)
        """
        return runtime_tensor_groups(
            n_params,
            batch,
            seq,
            hidden,
            layers,
            optimizer=self.optimizer,
            grad_nbytes_per_param=self.grad_nbytes_per_param,
            grad_staging=self.grad_staging,
            optimizer_offload=self.optimizer_offload,
            activations=None if shape is None else self.activation_estimate(shape, batch, seq),
        )

    def activation_estimate(self, shape: ModelShape, batch: int, seq: int) -> ActivationEstimate:
        """The activations this layout offloads per step for ``shape`` at ``batch`` x ``seq``.

        >>> HostLayout(activations="off").activation_estimate(
        ...     ModelShape("tiny", 2, 64, 128, 4, 2, 16, 100), 1, 8).host_nbytes
        0
        """
        return estimate_activations(
            shape,
            batch=batch,
            seq=seq,
            mode=self.activations,
            dtype_nbytes=self.grad_nbytes_per_param,
            min_nbytes=self.activation_min_nbytes,
            loss_chunk_tokens=self.loss_chunk_tokens,
        )


# The layout of offload.enable()'s defaults: Adam(W), bf16 gradients, no accumulation, every
# saved tensor of at least 1 MiB offloaded.
DEFAULT_LAYOUT = HostLayout()


def plan_placements(
    topology: Topology,
    policy: str,
    budgets: Mapping[str, int | str],
    *,
    n_params: int,
    hidden: int,
    layers: int,
    tokens: int,
    layout: HostLayout = DEFAULT_LAYOUT,
    shape: ModelShape | None = None,
) -> dict:
    """Placement per tensor class from ``policy`` for a model and micro-batch of ``tokens``,
    over the host groups of ``layout`` (what this runtime allocates; activations sized from
    the decoder's ``shape`` when it is known).

    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 34, free_bytes=1 << 33)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> plan = plan_placements(topo, "cxl_aware", {"dram": "1GiB"}, n_params=1000, hidden=8,
    ...                        layers=2, tokens=16)
    >>> plan["activations"].nodes
    (0,)
    """
    groups = layout.groups(n_params, 1, tokens, hidden, layers, shape=shape)
    return get_policy(policy)(groups, topology.tiers, budgets).by_class()
