"""Tiered host memory: machine topology, per-buffer NUMA placement, pinned buffers and budgets.

Depends on nothing else in this project; ``optim_cpu``, ``profilers`` and ``offload`` build on it.
"""

from allocators.cuda_host import PinningFallbackWarning
from allocators.declared_topology import load_declared, shipped_topologies
from allocators.errors import (
    BudgetExceededError,
    ConfigError,
    KernelBuildError,
    NumaError,
    OffloadError,
    PlacementError,
    TopologyError,
)
from allocators.host_buffer import HostBuffer, PlacementDriftWarning
from allocators.host_pool import HostPool, PoolStats
from allocators.numa import NumaFallbackWarning, NumaUnavailableError
from allocators.placement import Placement, as_placement, interleave
from allocators.policies import POLICIES, Budgets, PolicyResult, get_policy, parse_budgets
from allocators.sysfs_topology import discover
from allocators.tensor_classes import TENSOR_CLASSES, TensorClass, TensorGroup
from allocators.tiered import Allocation, TieredAllocator
from allocators.topology import GpuInfo, NodeRates, NumaNode, Tiers, Topology
from allocators.topology_json import topology_to_dict
from allocators.topology_table import print_topology, topology_table
from allocators.units import format_bytes, parse_size

__all__ = [
    "Allocation",
    "as_placement",
    "BudgetExceededError",
    "ConfigError",
    "Budgets",
    "discover",
    "format_bytes",
    "get_policy",
    "GpuInfo",
    "HostBuffer",
    "HostPool",
    "KernelBuildError",
    "interleave",
    "load_declared",
    "NodeRates",
    "NumaError",
    "NumaFallbackWarning",
    "NumaNode",
    "NumaUnavailableError",
    "OffloadError",
    "parse_budgets",
    "parse_size",
    "PinningFallbackWarning",
    "Placement",
    "PlacementDriftWarning",
    "PlacementError",
    "POLICIES",
    "PolicyResult",
    "PoolStats",
    "print_topology",
    "shipped_topologies",
    "TENSOR_CLASSES",
    "TensorClass",
    "TensorGroup",
    "TieredAllocator",
    "Tiers",
    "Topology",
    "topology_table",
    "topology_to_dict",
    "TopologyError",
]
