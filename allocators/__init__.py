"""Tiered host memory: machine topology, per-buffer NUMA placement, pinned buffers and budgets.

Depends on nothing else in this project; ``optim_cpu``, ``profilers`` and ``offload`` build on it.
"""

from allocators.errors import (
    BudgetExceededError,
    NumaError,
    OffloadError,
    PlacementError,
    TopologyError,
)
from allocators.topology import GpuInfo, NodeRates, NumaNode, Tiers, Topology
from allocators.units import format_bytes, parse_size

__all__ = [
    "BudgetExceededError",
    "GpuInfo",
    "NodeRates",
    "NumaError",
    "NumaNode",
    "OffloadError",
    "PlacementError",
    "Tiers",
    "Topology",
    "TopologyError",
    "format_bytes",
    "parse_size",
]
