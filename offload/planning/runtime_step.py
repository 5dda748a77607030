"""The step offload.enable() runs, as the simulator's StepConfig: one definition, read from an
OffloadConfig, for the planner, `offload plan --runtime ours`, the experiments and the validation.

It translates settings only; it must not plan, simulate, allocate or touch a model.
:func:`host_groups` gives the host tensor groups that go with a step, so the planner places what
that runtime allocates.

What enable() does, and so what is simulated: params stay on the device (no host copy streamed
per layer; the updated half-precision params go back after the step), gradients land on the host
in their own dtype and the CPU optimizer reads them there (no fp32 master gradients), finished
buckets are stepped during backward unless ``overlap_step`` is off or ``max_grad_norm`` needs
every gradient first, the loss's fp32 log-probs leave with the activations unless
``loss_chunk_tokens`` chunks the loss, and saved tensors under ``activation_min_nbytes`` stay on
the device. The activations simulated are those the hooks move in the run's mode
(offload.planning.activation_bytes): ``"checkpoint"`` (the paper's mode: layer inputs, the layers
recomputed in backward), ``"saved_tensors"`` (enable()'s default: every saved tensor, nothing
recomputed) or ``"off"``.
"""

from __future__ import annotations

from allocators.tensor_classes import TensorGroup
from offload.config import OffloadConfig
from offload.planning.host_groups import host_tensor_groups
from offload.planning.host_layout import HostLayout
from offload.planning.model_shapes import ModelShape
from offload.planning.simulator.compute import GpuModel
from offload.planning.simulator.step import SimulationError, StepConfig


def runtime_step(
    settings: OffloadConfig | None = None,
    *,
    param_nbytes: int = 2,
    optimizer: str = "adamw",
    gpu: GpuModel | None = None,
) -> StepConfig:
    """The simulator's settings for a step of ``offload.enable`` run with ``settings``
    (default: enable()'s defaults in the paper's activation mode, ``"checkpoint"``), a model
    whose params are ``param_nbytes`` bytes each (2: bf16) and ``optimizer``.

    Raises SimulationError for settings the simulator does not model (the message says which
    to use instead).

    >>> step = runtime_step()
    >>> step.offload_params, step.fp32_master_grads, step.overlap_step, step.recompute
    (False, False, True, True)
    >>> runtime_step(OffloadConfig(activations="checkpoint", max_grad_norm=1.0)).overlap_step
    False
    >>> runtime_step(OffloadConfig()).recompute
    False
    """
    settings = settings or OffloadConfig(activations="checkpoint")
    if not settings.optimizer_offload:
        raise SimulationError(
            "optimizer_offload = False is not simulated: the simulator models the CPU "
            "optimizer's step; simulate optimizer_offload=True"
        )
    offloaded = settings.activations != "off"
    return StepConfig(
        optimizer=optimizer,
        offload_params=False,
        recompute=settings.activations == "checkpoint",
        offload_activations=offloaded,
        # Clipping needs the global norm, so enable() then steps every bucket at step().
        overlap_step=settings.overlap_step and settings.max_grad_norm is None,
        param_nbytes=param_nbytes,
        fp32_master_grads=False,
        activation_mode=settings.activations,
        activation_min_nbytes=settings.activation_min_nbytes,
        loss_chunk_tokens=settings.loss_chunk_tokens,
        gpu=gpu or GpuModel(),
    )


# Our runtime in the paper's setting: enable()'s defaults, bf16, activations="checkpoint".
OUR_RUNTIME = runtime_step()


def host_groups(
    step: StepConfig, shape: ModelShape, batch: int, seq: int
) -> tuple[TensorGroup, ...]:
    """The host items of a runtime that runs ``step``, for ``shape`` at ``batch`` x ``seq``,
    in the order the policies visit them: with fp32 master gradients, DeepSpeed's (the paper's
    seven, bf16 weights included); without, ours (offload.planning.host_layout.HostLayout:
    optimizer state and masters, the activations of the step's mode, gradients as they land; no
    host copy of the weights).

    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.step import DEEPSPEED_ZERO3
    >>> shape = MODELS["llama-1.1b"]
    >>> [g.name for g in host_groups(OUR_RUNTIME, shape, 1, 4096)]
    ['momentum', 'variance', 'master_params', 'activation_checkpoints', 'compute_grads']
    >>> [g.name for g in host_groups(DEEPSPEED_ZERO3, shape, 1, 4096)][2:5]
    ['master_grads', 'master_params', 'compute_params']
    """
    # Adam and AdamW keep the same state; the host groups name the family.
    optimizer = "lion" if step.optimizer == "lion" else "adam"
    sizes = (shape.n_params, batch, seq, shape.hidden, shape.layers)
    if step.fp32_master_grads:
        return host_tensor_groups(*sizes, optimizer)
    layout = HostLayout(
        optimizer=optimizer,
        grad_nbytes_per_param=step.param_nbytes,
        activations=step.activation_mode or "checkpoint",
        activation_min_nbytes=step.activation_min_nbytes,
        loss_chunk_tokens=step.loss_chunk_tokens,
    )
    # A step without our mode counts the paper's layer inputs: size the group the same way.
    return layout.groups(*sizes, shape=None if step.activation_mode is None else shape)
