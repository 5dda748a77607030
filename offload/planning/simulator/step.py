"""The step-time simulator: forward, backward and optimizer-step phases of one offloaded training
step, from a model shape, (micro-batch, sequence), a placement per tensor class and a rate model.

It predicts; it must not allocate, place or time anything, and it holds no per-case constants.

Per phase, the phase takes the longer of its GPU compute and its memory traffic (DMA overlapped
with compute, as the runtime prefetches and offloads on side streams), plus the one layer of
parameter fetch that cannot overlap. Traffic per tensor class and phase:

| class | forward | backward | step |
|---|---|---|---|
| params (bf16, 2P) | H2D 2P (ZeRO-3) | H2D 2P (ZeRO-3) | CPU writes 2P; H2D 2P (ZeRO-2) |
| activations (2bshL; ours: what its hooks save) | D2H | H2D | |
| grads (bf16, 2P) | | D2H 2P, CPU reads 2P | |
| master_grads (fp32, 4P) | | CPU writes 4P | CPU reads 4P |
| master_params (fp32, 4P) | | | CPU reads and writes 4P |
| optimizer_state (Adam 8P, Lion 4P) | | | CPU reads and writes it all |

With ``overlap_step`` the optimizer's CPU traffic, and the copy of each bucket's updated params back
to the device, run during backward (sharing the nodes and the link with its DMA), and only the last
bucket's step and copy (1/L of them) are left exposed after backward.

The table is DeepSpeed's layout for a bf16 model. ``StepConfig.param_nbytes`` (2: bf16, 4: fp32)
scales params, grads and activations; ``fp32_master_grads=False`` is our runtime's layout: the
optimizer reads the gradients where they landed (no fp32 copy in backward), and an fp32 model's
optimizer writes its master, which is copied to the device as it is (no half copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from allocators.errors import OffloadError
from allocators.placement import Placement
from allocators.tensor_classes import STATE_NBYTES_PER_PARAM
from offload.planning.activation_bytes import estimate_activations
from offload.planning.model_shapes import ModelShape
from offload.planning.simulator.compute import GpuModel, compute_seconds
from offload.planning.simulator.rates import SimRates
from offload.planning.simulator.traffic import Traffic, memory_seconds

Phase = Literal["forward", "backward", "step"]

# DeepSpeed's per-step cost beyond its compute, DMA and CPU Adam, per parameter: fitted once on the
# 1.1B ZeRO-2 run at 8K of reference/MEASURED.md (0.871 s measured against 0.542 s simulated on
# that machine's rates; simulator.calibration.reference_rows recomputes it). It is charged the
# same under every placement; our runtime (overlap_step) has none.
DEEPSPEED_OVERHEAD_S_PER_PARAM = 3.0e-10


class SimulationError(OffloadError, ValueError):
    """The simulator was given a configuration it cannot model; the message says what to change."""


@dataclass(frozen=True)
class StepConfig:
    """How the step runs.

    - ``offload_params``: bf16 parameters live on the host and stream in per layer (ZeRO-3, the
      paper's setting); False keeps them on the GPU (ZeRO-2) and copies them back after the step.
    - ``recompute``: layers are recomputed from their input checkpoints in backward.
    - ``offload_activations``: those checkpoints go to the host (False: they stay in HBM).
    - ``overlap_step``: the CPU optimizer steps finished gradient buckets during backward (our
      runtime); False steps after backward (DeepSpeed, the paper).
    - ``overhead_s_per_param``: a framework's fixed per-step cost per parameter.
    - ``param_nbytes``: bytes per element of the model's params, grads and activations (2: bf16).
    - ``fp32_master_grads``: backward copies gradients into fp32 master gradients on the host
      (DeepSpeed); False: the optimizer reads them as they landed (our runtime).
    - ``activation_mode``: None counts the paper's activations, one [b, s, h] layer input per
      layer; our runtime's mode (``"checkpoint"``, ``"saved_tensors"``) counts every tensor its
      saved-tensor hooks move in that mode (offload.planning.activation_bytes: with the loss's fp32
      log-probs, stored once, unless ``loss_chunk_tokens`` chunks the loss).
    - ``activation_min_nbytes``: saved tensors smaller than this stay on the device (our
      runtime's setting of that name); 0 offloads every one.

    >>> StepConfig().optimizer
    'adam'
    """

    optimizer: str = "adam"
    offload_params: bool = True
    recompute: bool = True
    offload_activations: bool = True
    overlap_step: bool = False
    overhead_s_per_param: float = 0.0
    gpu: GpuModel = field(default_factory=GpuModel)
    param_nbytes: int = 2
    fp32_master_grads: bool = True
    activation_mode: str | None = None
    activation_min_nbytes: int = 0
    loss_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in STATE_NBYTES_PER_PARAM:
            raise SimulationError(
                f"optimizer {self.optimizer!r} is not modelled; write 'adam', 'adamw' or 'lion'"
            )
        if self.param_nbytes not in (2, 4):
            raise SimulationError(
                f"param_nbytes = {self.param_nbytes!r} is not modelled; write 2 (bf16/fp16) or "
                "4 (fp32)"
            )


# The paper's runtime. Ours (params on the device, no fp32 master gradients, the step overlapped)
# is offload.planning.runtime_step.OUR_RUNTIME, read from offload.enable()'s settings.
DEEPSPEED_ZERO3 = StepConfig(overhead_s_per_param=DEEPSPEED_OVERHEAD_S_PER_PARAM)


@dataclass(frozen=True)
class StepPrediction:
    """Predicted seconds per phase, what bounds each phase, and tokens per second.

    ``bottlenecks`` maps a phase to ``"compute"`` or to the memory bound that set it (``"node 1"``,
    ``"link h2d"``...). ``overhead_s`` is the framework's placement-independent cost.
    """

    forward_s: float
    backward_s: float
    step_s: float
    overhead_s: float
    tokens: int
    bottlenecks: dict[str, str]

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.step_s + self.overhead_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s


def _activation_nbytes(shape: ModelShape, batch: int, seq: int, config: StepConfig) -> int:
    if config.activation_mode is not None:
        return estimate_activations(
            shape,
            batch=batch,
            seq=seq,
            mode=config.activation_mode,  # type: ignore[arg-type]
            dtype_nbytes=config.param_nbytes,
            min_nbytes=config.activation_min_nbytes,
            loss_chunk_tokens=config.loss_chunk_tokens,
        ).moved_nbytes
    checkpoint = config.param_nbytes * batch * seq * shape.hidden
    return shape.layers * checkpoint if checkpoint >= config.activation_min_nbytes else 0


def phase_traffic(
    shape: ModelShape,
    batch: int,
    seq: int,
    placements: Mapping[str, Placement],
    config: StepConfig,
) -> dict[str, Traffic]:
    """Bytes per node for each phase (``forward``, ``backward``, ``step_cpu``, ``step_dma``), from
    the table in the module docstring and a placement per tensor class.

    >>> from offload.planning.model_shapes import MODELS
    >>> from allocators.placement import as_placement
    >>> every = {c: as_placement(0) for c in ("params", "activations", "grads", "master_grads",
    ...          "master_params", "optimizer_state")}
    >>> t = phase_traffic(MODELS["llama-1.1b"], 1, 1024, every, StepConfig())
    >>> t["forward"].h2d[0] == 2 * MODELS["llama-1.1b"].n_params
    True
    """
    p = shape.n_params
    pb = config.param_nbytes
    activations = _activation_nbytes(shape, batch, seq, config)
    state = STATE_NBYTES_PER_PARAM[config.optimizer] * p
    # Where the device's copy of the params comes from after the step: the half copy the
    # optimizer writes, or (an fp32 model in our runtime) the master itself.
    source = "master_params" if pb == 4 and not config.fp32_master_grads else "params"
    rows: list[tuple[str, str, str, float]] = []
    if source == "params":
        rows.append(("params", "step_cpu", "cpu", pb * p))
    rows.append(("grads", "backward", "d2h", pb * p))
    if config.fp32_master_grads:
        rows += [
            ("grads", "backward", "cpu", pb * p),
            ("master_grads", "backward", "cpu", 4 * p),
            ("master_grads", "step_cpu", "cpu", 4 * p),
        ]
    else:
        rows.append(("grads", "step_cpu", "cpu", pb * p))
    rows += [
        ("master_params", "step_cpu", "cpu", 4 * p),
        ("master_params", "step_cpu", "cpu", 4 * p),
        ("optimizer_state", "step_cpu", "cpu", state),
        ("optimizer_state", "step_cpu", "cpu", state),
    ]
    if config.offload_activations:
        rows += [
            ("activations", "forward", "d2h", activations),
            ("activations", "backward", "h2d", activations),
        ]
    if config.offload_params:
        rows += [("params", "forward", "h2d", pb * p), ("params", "backward", "h2d", pb * p)]
    else:
        rows.append((source, "step_dma", "h2d", pb * p))
    phases = {name: Traffic() for name in ("forward", "backward", "step_cpu", "step_dma")}
    for tensor_class, phase, kind, nbytes in rows:
        if tensor_class not in placements:
            raise SimulationError(
                f"no placement for tensor class {tensor_class!r}; give one for each of "
                "params, activations, grads, master_grads, master_params, optimizer_state"
            )
        phases[phase].add(kind, nbytes, placements[tensor_class])
    return phases


def simulate_step(
    shape: ModelShape,
    batch: int,
    seq: int,
    placements: Mapping[str, Placement],
    rates: SimRates,
    config: StepConfig = DEEPSPEED_ZERO3,
) -> StepPrediction:
    """Predict one training step's phases; ``placements`` maps tensor class -> Placement (as
    ``PolicyResult.by_class()`` gives it).

    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import paper_rates
    >>> from allocators.placement import as_placement
    >>> every = {c: as_placement(0) for c in ("params", "activations", "grads", "master_grads",
    ...          "master_params", "optimizer_state")}
    >>> pred = simulate_step(MODELS["qwen2.5-7b"], 1, 4096, every, paper_rates(1))
    >>> pred.bottlenecks["step"]
    'node 0'
    """
    if batch < 1 or seq < 1:
        raise SimulationError(f"batch = {batch}, seq = {seq}: both must be at least 1")
    traffic = phase_traffic(shape, batch, seq, placements, config)
    fwd_compute, bwd_compute = compute_seconds(shape, batch, seq, config.gpu, config.recompute)
    # The first layer's parameters must arrive before any compute can start, in each pass.
    fill_s = 0.0
    if config.offload_params:
        fill_s = config.param_nbytes * shape.n_params_per_layer / (rates.link_gib_per_s * (1 << 30))
    step_cpu = memory_seconds(traffic["step_cpu"], rates)
    step_dma = memory_seconds(traffic["step_dma"], rates)
    forward_mem = memory_seconds(traffic["forward"], rates)
    backward_traffic = traffic["backward"]
    if config.overlap_step:
        # Each finished bucket is stepped and its params copied back while backward goes on.
        backward_traffic = backward_traffic.merged(traffic["step_cpu"]).merged(traffic["step_dma"])
    backward_mem = memory_seconds(backward_traffic, rates)
    if config.overlap_step:
        # What backward could not hide: the last bucket, stepped and copied once it is done.
        step_s = (step_cpu.seconds + step_dma.seconds) / shape.layers
    else:
        step_s = step_cpu.seconds + step_dma.seconds

    def bound(compute_s: float, mem_s: float, label: str) -> tuple[float, str]:
        return (compute_s, "compute") if compute_s >= mem_s else (mem_s, label)

    forward_s, forward_by = bound(fwd_compute, forward_mem.seconds, forward_mem.bottleneck)
    backward_s, backward_by = bound(bwd_compute, backward_mem.seconds, backward_mem.bottleneck)
    return StepPrediction(
        forward_s=forward_s + fill_s,
        backward_s=backward_s + fill_s,
        step_s=step_s,
        overhead_s=config.overhead_s_per_param * shape.n_params,
        tokens=batch * seq,
        bottlenecks={
            "forward": forward_by,
            "backward": backward_by,
            "step": step_cpu.bottleneck,
        },
    )
