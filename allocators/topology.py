"""The machine's memory tiers as plain data: NUMA nodes, GPUs, distances, and their grouping into
tiers. Discovery (sysfs, NVML) and declared YAML files build these; nothing here reads the OS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from allocators.errors import PlacementError

NodeKind = Literal["dram", "cxl"]


@dataclass(frozen=True)
class NodeRates:
    """Measured or declared rates of one NUMA node; ``None`` where nothing is known.

    ``h2d``/``d2h`` are DMA rates between a pinned buffer on this node and the GPU; ``read``,
    ``write`` are CPU stream rates from this node's memory.
    """

    latency_ns: float | None = None
    read_gib_per_s: float | None = None
    write_gib_per_s: float | None = None
    h2d_gib_per_s: float | None = None
    d2h_gib_per_s: float | None = None


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node with memory.

    A node with memory and no CPUs is far memory (``kind="cxl"``): that is how CXL expanders show
    up in Linux. ``movable_only`` is True when all of its memory sits in ZONE_MOVABLE, where
    pinning a page may migrate it to another node.

    >>> NumaNode(id=0, kind="dram", cpus=(0, 1), total_bytes=2**34, free_bytes=2**33).has_cpus
    True
    """

    id: int
    kind: NodeKind
    cpus: tuple[int, ...]
    total_bytes: int
    free_bytes: int
    movable_only: bool = False
    memory_tier: int | None = None
    cxl_evidence: tuple[str, ...] = ()
    rates: NodeRates = field(default_factory=NodeRates)

    @property
    def has_cpus(self) -> bool:
        return bool(self.cpus)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU and the NUMA node its PCIe root is attached to.

    ``numa_node_known`` is False when the platform reported -1 (common in VMs); ``numa_node`` then
    holds the node we chose to treat as local, and ``Topology.notes`` says so.
    """

    index: int
    name: str
    pci_bus_id: str
    numa_node: int
    numa_node_known: bool
    total_bytes: int
    source: Literal["nvml", "sysfs", "declared"]


@dataclass(frozen=True)
class Tiers:
    """Nodes grouped by how they serve one GPU: HBM, nearest DRAM, other DRAM, CXL devices.

    ``cxl`` holds one entry per CXL node, nearest first.
    """

    hbm: tuple[GpuInfo, ...]
    local_dram: tuple[NumaNode, ...]
    remote_dram: tuple[NumaNode, ...]
    cxl: tuple[NumaNode, ...]


@dataclass(frozen=True)
class Topology:
    """A machine: its NUMA nodes, the distance matrix, its GPUs, and where the facts came from.

    ``distances[a][b]`` is the ACPI SLIT distance (10 = local). ``source`` says
    ``"sysfs:/sys"`` or ``"declared:paper-1aic.yaml"``; ``notes`` lists assumptions made while
    reading it (an unknown GPU node, a missing meminfo) so reports can repeat them.

    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 30, free_bytes=1 << 29)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> [n.id for n in topo.tiers.local_dram]
    [0]
    """

    nodes: tuple[NumaNode, ...]
    distances: dict[int, dict[int, int]]
    gpus: tuple[GpuInfo, ...]
    source: str
    name: str = ""
    notes: tuple[str, ...] = ()

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    def node(self, node_id: int) -> NumaNode:
        """Return node ``node_id`` or raise a PlacementError naming the nodes that exist."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise PlacementError(
            f"NUMA node {node_id} does not exist on {self.name or self.source}; "
            f"nodes with memory: {list(self.node_ids)}"
        )

    def distance(self, a: int, b: int) -> int:
        """SLIT distance from node ``a`` to node ``b``; 10 on the diagonal, 20 when unknown."""
        if a == b:
            return self.distances.get(a, {}).get(b, 10)
        return self.distances.get(a, {}).get(b, 20)

    def anchor_node(self, gpu_index: int = 0) -> int:
        """The CPU node that counts as local: the GPU's node, else the first node with CPUs."""
        for gpu in self.gpus:
            if gpu.index == gpu_index:
                return gpu.numa_node
        cpu_nodes = [n.id for n in self.nodes if n.has_cpus]
        return cpu_nodes[0] if cpu_nodes else self.nodes[0].id

    def tiers_for(self, gpu_index: int = 0) -> Tiers:
        """Group the nodes as seen from GPU ``gpu_index`` (or from the first CPU node without one).

        Local DRAM is every DRAM node at the smallest distance from the anchor node; CXL nodes are
        ordered nearest first so striping over "the k nearest devices" is a slice.
        """
        anchor = self.anchor_node(gpu_index)
        dram = [n for n in self.nodes if n.kind == "dram"]
        cxl = [n for n in self.nodes if n.kind == "cxl"]
        nearest = min((self.distance(anchor, n.id) for n in dram), default=10)
        local = tuple(n for n in dram if self.distance(anchor, n.id) == nearest)
        remote = tuple(
            sorted(
                (n for n in dram if n not in local),
                key=lambda n: (self.distance(anchor, n.id), n.id),
            )
        )
        cxl_sorted = tuple(sorted(cxl, key=lambda n: (self.distance(anchor, n.id), n.id)))
        hbm = tuple(g for g in self.gpus if g.index == gpu_index)
        return Tiers(hbm=hbm, local_dram=local, remote_dram=remote, cxl=cxl_sorted)

    @property
    def tiers(self) -> Tiers:
        """Tiers as seen from GPU 0 (or the first CPU node on a machine without a GPU)."""
        return self.tiers_for(0)
