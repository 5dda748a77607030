"""The paper's experimental setup in one place: its models, its (micro-batch, sequence) sweep, its
machines (declared topologies) and the local-DRAM cap we use where it does not state one.

Settings only; it must not run or time anything.
"""

from __future__ import annotations

from allocators.tensor_classes import TensorGroup
from offload.planning.host_groups import host_tensor_groups, nbytes_by_group
from offload.planning.model_shapes import MODELS, ModelShape

PAPER_MODELS = ("qwen2.5-7b", "mistral-nemo-12b")
PAPER_SWEEP = ((1, 4096), (8, 4096), (16, 4096), (1, 32768), (2, 32768), (3, 32768))
# Number of CXL add-in cards -> declared topology shipped in allocators/topologies.
PAPER_TOPOLOGIES = {1: "paper-1aic", 2: "paper-2aic"}


def paper_groups(model: str | ModelShape, batch: int, seq: int) -> tuple[TensorGroup, ...]:
    """The paper's seven host items for a model and (micro-batch, sequence), Adam optimizer.

    >>> [g.name for g in paper_groups("qwen2.5-7b", 1, 4096)][:2]
    ['momentum', 'variance']
    """
    shape = MODELS[model] if isinstance(model, str) else model
    return host_tensor_groups(shape.n_params, batch, seq, shape.hidden, shape.layers)


def paper_budgets(groups: tuple[TensorGroup, ...], cxl_nbytes: int) -> dict[str, int]:
    """Budgets for the CXL runs: local DRAM holds the CPU-touched group, the weights and half the
    activation checkpoints; the rest must go to CXL.

    The paper caps local DRAM with a boot-time reservation but does not give the cap; this one
    makes every branch of its greedy occur (local, interleave, CXL-only), and is the same for
    every policy. local_only, the reference, gets all it needs.

    >>> g = paper_groups("qwen2.5-7b", 1, 4096)
    >>> b = paper_budgets(g, 256 << 30)
    >>> b["dram"] == sum(i.nbytes for i in g[:5]) + g[5].nbytes // 2
    True
    """
    by_name = nbytes_by_group(groups)
    dram = (
        by_name["latency_critical"]
        + by_name["compute_params"]
        + by_name["activation_checkpoints"] // 2
    )
    return {"dram": dram, "cxl": cxl_nbytes}


def local_only_budgets(groups: tuple[TensorGroup, ...]) -> dict[str, int]:
    """The DRAM-only reference: local DRAM holds everything.

    >>> local_only_budgets(paper_groups("llama-1.1b", 1, 1024))["dram"] > 0
    True
    """
    return {"dram": sum(g.nbytes for g in groups)}
