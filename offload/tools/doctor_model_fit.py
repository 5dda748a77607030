"""`offload doctor --model`: will this model's offloaded host memory fit this machine? Sizes come
from what offload.enable() allocates (offload.planning.host_groups.runtime_tensor_groups); nothing is
allocated or timed here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from allocators.topology import Topology
from allocators.units import format_bytes
from offload.planning.activation_bytes import ACTIVATION_MODES
from offload.planning.host_groups import nbytes_by_group
from offload.planning.host_layout import DEFAULT_LAYOUT, HostLayout
from offload.planning.model_shapes import ModelShape
from offload.tools.doctor import CheckResult

# Below this much free host memory left over, the process, pinned staging and the page cache
# start to compete with the offloaded state: a warning, not a failure.
HEADROOM_NBYTES = 8 << 30


@dataclass(frozen=True)
class ModelWorkload:
    """The training run to size: model shape, sequence, batch and what it keeps on the host
    (``layout``: by default offload.enable()'s, activations="saved_tensors")."""

    shape: ModelShape
    seq: int
    batch: int = 1
    layout: HostLayout = DEFAULT_LAYOUT


def host_need_nbytes(work: ModelWorkload) -> dict[str, int]:
    """Host bytes per group offload.enable() allocates for ``work``.

    >>> from offload.planning.model_shapes import MODELS
    >>> need = host_need_nbytes(ModelWorkload(MODELS["qwen2.5-7b"], seq=32768))
    >>> round(sum(need.values()) / 2**30), round(need["activation_checkpoints"] / 2**30)
    (329, 230)
    """
    shape = work.shape
    groups = work.layout.groups(
        shape.n_params,
        work.batch,
        work.seq,
        shape.hidden,
        shape.layers,
        shape=shape,
    )
    return nbytes_by_group(groups)


def activation_needs_nbytes(work: ModelWorkload) -> dict[str, int]:
    """Host bytes of ``work``'s activations in each mode offload.enable() offers, the rest of
    its layout unchanged: what switching ``activations`` would save.

    >>> from offload.planning.model_shapes import MODELS
    >>> needs = activation_needs_nbytes(ModelWorkload(MODELS["llama-1.1b"], seq=4096))
    >>> needs["off"], needs["saved_tensors"] > 8 * needs["checkpoint"]
    (0, True)
    """
    return {
        mode: replace(work.layout, activations=mode)
        .activation_estimate(work.shape, work.batch, work.seq)
        .host_nbytes
        for mode in ACTIVATION_MODES
    }


def check_model_fits(
    topo: Topology, work: ModelWorkload, budget_nbytes: int | None = None
) -> CheckResult:
    """Fail when the host memory the run needs is more than its budgets (when given) or than
    the CPU and CXL nodes have free; warn when less than 8 GiB would be left over. The finding
    also gives the run's total in the other activation modes.

    >>> from allocators.topology import NumaNode
    >>> from offload.planning.model_shapes import MODELS
    >>> node = NumaNode(0, "dram", (0,), 125 << 30, 110 << 30)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> qwen = ModelWorkload(MODELS["qwen2.5-7b"], seq=32768)
    >>> check_model_fits(topo, qwen).status
    'fail'
    >>> lean = HostLayout(activations="checkpoint", loss_chunk_tokens=4096)
    >>> check_model_fits(topo, replace(qwen, layout=lean)).status
    'warn'
    >>> check_model_fits(topo, ModelWorkload(MODELS["mistral-nemo-12b"], seq=4096)).status
    'fail'
    """
    need = host_need_nbytes(work)
    total = sum(need.values())
    free = sum(node.free_bytes for node in topo.nodes)
    parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in need.items())
    mode = work.layout.activations
    finding = (
        f"{work.shape.name} at {work.batch} x {work.seq} tokens with activations={mode!r} "
        f"needs {format_bytes(total)} of host memory ({parts}); free here: "
        f"{format_bytes(free)}; {_other_modes(work, total)}"
    )
    if budget_nbytes is not None:
        finding += f"; budgets: {format_bytes(budget_nbytes)}"
    # Only the settings this run does not use yet are worth suggesting.
    lighter = []
    if mode == "saved_tensors":
        lighter.append("activations='checkpoint' keeps only layer inputs on the host")
    if mode != "off" and work.layout.loss_chunk_tokens is None:
        lighter.append("loss_chunk_tokens keeps the loss's fp32 log-probs off it")
    fix = "shorten the sequence or batch, add memory (a CXL card), or train fewer parameters " + (
        "(e.g. LoRA)" + ("; " + ", and ".join(lighter) if lighter else "")
    )
    if budget_nbytes is not None and total > budget_nbytes:
        return CheckResult("model fits", "fail", finding, "raise the budgets, or " + fix)
    if total > free:
        return CheckResult("model fits", "fail", finding, fix)
    if free - total < HEADROOM_NBYTES:
        return CheckResult(
            "model fits",
            "warn",
            finding,
            f"less than {format_bytes(HEADROOM_NBYTES)} would be left for the process, pinned "
            "staging and the page cache; stop other jobs or " + fix,
        )
    return CheckResult("model fits", "ok", finding)


def _other_modes(work: ModelWorkload, total: int) -> str:
    """E.g. "activations='checkpoint' needs 20.1 GiB": the run's total in the other modes."""
    needs = activation_needs_nbytes(work)
    own = needs[work.layout.activations]
    return "; ".join(
        f"activations={mode!r} needs {format_bytes(total - own + nbytes)}"
        for mode, nbytes in needs.items()
        if mode != work.layout.activations
    )
