"""GPU compute time of a training step from a FLOP count (dense matmuls plus causal attention) at a
stated model-FLOPs utilisation. Arithmetic only: it must not touch a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from offload.planning.model_shapes import ModelShape


@dataclass(frozen=True)
class GpuModel:
    """A compute device as the simulator sees it: its peak (a GPU's dense bf16 peak, or a CPU's
    measured rate, see :func:`fitted_device`) and the fraction of it a step reaches.

    The default MFU, 0.36, is the mean of the three all-on-GPU runs of the 1.1B Llama in
    reference/MEASURED.md (H100: 0.333 at 8K without checkpointing, 0.353 at 8K and 0.386 at 32K
    with it), so those runs come out within +7/-2/-7 % of their measured tokens/s.

    >>> GpuModel().effective_flops_per_s / 1e12
    356.184
    """

    name: str = "H100 (bf16 dense 989.4 TFLOP/s)"
    peak_flops_per_s: float = 989.4e12
    mfu: float = 0.36

    @property
    def effective_flops_per_s(self) -> float:
        return self.peak_flops_per_s * self.mfu


def forward_flops(shape: ModelShape, batch: int, seq: int) -> float:
    """FLOPs of one forward pass: 2 per matmul weight per token, plus causal attention
    (QK^T and AV, 2 b s^2 (heads x head_dim) per layer after halving for the mask).

    The input embedding is a lookup (no FLOPs); a tied LM head still multiplies.

    >>> from offload.planning.model_shapes import MODELS
    >>> f"{forward_flops(MODELS['qwen2.5-7b'], 1, 4096):.3e}"
    '6.129e+13'
    """
    matmul_params = shape.n_params - (0 if shape.tied_embeddings else shape.vocab * shape.hidden)
    tokens = batch * seq
    attention = 2 * batch * seq * seq * shape.heads * shape.head_dim * shape.layers
    return 2.0 * matmul_params * tokens + attention


def compute_seconds(
    shape: ModelShape, batch: int, seq: int, gpu: GpuModel, recompute: bool = True
) -> tuple[float, float]:
    """Forward and backward GPU seconds; backward is twice the forward, plus one more forward when
    layers are recomputed from their checkpoints (the paper's setting).

    >>> from offload.planning.model_shapes import MODELS
    >>> fwd, bwd = compute_seconds(MODELS["llama-1.1b"], 1, 8192, GpuModel())
    >>> round(bwd / fwd, 1)
    3.0
    """
    fwd = forward_flops(shape, batch, seq) / gpu.effective_flops_per_s
    return fwd, fwd * (3.0 if recompute else 2.0)


def fitted_device(
    shape: ModelShape,
    batch: int,
    seq: int,
    forward_s: float,
    name: str,
    peak_flops_per_s: float | None = None,
) -> GpuModel:
    """A device whose effective FLOP/s is read off one measured forward pass of ``shape`` at
    (``batch``, ``seq``): a CPU (no peak given: the fitted rate is taken as its peak, MFU 1), or a
    GPU whose MFU is then the fitted rate over ``peak_flops_per_s``. Fit on one run, predict others.

    >>> from offload.planning.model_shapes import MODELS
    >>> shape = MODELS["llama-1.1b"]
    >>> cpu = fitted_device(shape, 1, 256, forward_flops(shape, 1, 256) / 1e11, "cpu")
    >>> cpu.effective_flops_per_s, cpu.mfu
    (100000000000.0, 1.0)
    """
    if not forward_s > 0:
        raise ValueError(f"forward_s = {forward_s!r}: a measured forward must take positive time")
    flops_per_s = forward_flops(shape, batch, seq) / forward_s
    if peak_flops_per_s is None:
        return GpuModel(name=name, peak_flops_per_s=flops_per_s, mfu=1.0)
    return GpuModel(
        name=name, peak_flops_per_s=peak_flops_per_s, mfu=flops_per_s / peak_flops_per_s
    )
