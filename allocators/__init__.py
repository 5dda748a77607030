"""Tiered host memory: machine topology, per-buffer NUMA placement, pinned buffers and budgets.

Depends on nothing else in this project; ``optim_cpu``, ``profilers`` and ``offload`` build on it.
"""

from allocators.declared_topology import load_declared, shipped_topologies
from allocators.errors import (
    BudgetExceededError,
    NumaError,
    OffloadError,
    PlacementError,
    TopologyError,
)
from allocators.host_buffer import HostBuffer
from allocators.host_pool import HostPool
from allocators.placement import Placement, as_placement, interleave
from allocators.policies import get_policy
from allocators.sysfs_topology import discover
from allocators.tiered import TieredAllocator
from allocators.topology import GpuInfo, NodeRates, NumaNode, Tiers, Topology
from allocators.topology_json import topology_to_dict
from allocators.topology_table import print_topology, topology_table
from allocators.units import format_bytes, parse_size

__all__ = [
    "BudgetExceededError",
    "GpuInfo",
    "HostBuffer",
    "HostPool",
    "NodeRates",
    "NumaError",
    "NumaNode",
    "OffloadError",
    "Placement",
    "PlacementError",
    "Tiers",
    "TieredAllocator",
    "Topology",
    "TopologyError",
    "as_placement",
    "discover",
    "format_bytes",
    "get_policy",
    "interleave",
    "load_declared",
    "parse_size",
    "print_topology",
    "shipped_topologies",
    "topology_table",
    "topology_to_dict",
]
