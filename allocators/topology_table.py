"""Render a Topology for people: a rich table of nodes, one of GPUs, and the notes under them.

Only presentation lives here; it must not discover or change the topology it is given. rich is
imported where a table is drawn: `import allocators` (and every training run) must not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from allocators.cpu_lists import format_cpu_list
from allocators.topology import NodeRates, Topology
from allocators.units import format_bytes

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

_RATE_COLUMNS = (
    ("latency_ns", "latency ns"),
    ("read_gib_per_s", "read GiB/s"),
    ("write_gib_per_s", "write GiB/s"),
    ("h2d_gib_per_s", "H2D GiB/s"),
    ("d2h_gib_per_s", "D2H GiB/s"),
)


def tier_labels(topo: Topology, gpu_index: int = 0) -> dict[int, str]:
    """Each node's role as seen from GPU ``gpu_index``: local DRAM, remote DRAM, CXL #k.

    >>> from allocators.declared_topology import load_declared
    >>> tier_labels(load_declared("paper-2aic"))
    {0: 'local DRAM', 1: 'CXL #1', 2: 'CXL #2'}
    """
    tiers = topo.tiers_for(gpu_index)
    labels = {n.id: "local DRAM" for n in tiers.local_dram}
    labels.update({n.id: "remote DRAM" for n in tiers.remote_dram})
    labels.update({n.id: f"CXL #{k}" for k, n in enumerate(tiers.cxl, start=1)})
    return dict(sorted(labels.items()))


def topology_table(topo: Topology) -> Table:
    """One row per memory node: kind, tier, CPUs, sizes, movable, memory tier, distance row.

    >>> from allocators.declared_topology import load_declared
    >>> topology_table(load_declared("paper-1aic")).row_count
    2
    """
    from rich.table import Table

    from allocators.table_width import wrap_not_cut

    labels = tier_labels(topo)
    table = Table(title=f"{topo.name or 'machine'} ({topo.source})", title_justify="left")
    for header in ("node", "kind", "tier", "cpus"):
        table.add_column(header)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("free", justify="right", no_wrap=True)
    table.add_column("movable")
    table.add_column("mem tier")
    table.add_column("distance to " + " ".join(str(i) for i in topo.node_ids))
    for node in topo.nodes:
        table.add_row(
            str(node.id),
            node.kind,
            labels.get(node.id, "-"),
            format_cpu_list(node.cpus) or "-",
            format_bytes(node.total_bytes),
            format_bytes(node.free_bytes),
            "yes" if node.movable_only else "no",
            "-" if node.memory_tier is None else str(node.memory_tier),
            " ".join(str(topo.distance(node.id, other)) for other in topo.node_ids),
        )
    return wrap_not_cut(table)


def rates_table(topo: Topology) -> Table | None:
    """Known rates per node (columns only for rates some node has); None when none is known.

    >>> from allocators.declared_topology import load_declared
    >>> [c.header for c in rates_table(load_declared("paper-1aic")).columns]
    ['node', 'latency ns', 'read GiB/s', 'H2D GiB/s', 'D2H GiB/s']
    """
    from rich.table import Table

    from allocators.table_width import wrap_not_cut

    keys = [key for key, _ in _RATE_COLUMNS if any(_rate(n.rates, key) for n in topo.nodes)]
    if not keys:
        return None
    table = Table(title="rates", title_justify="left")
    table.add_column("node")
    for key, header in _RATE_COLUMNS:
        if key in keys:
            table.add_column(header, justify="right")
    for node in topo.nodes:
        table.add_row(str(node.id), *(_format_rate(_rate(node.rates, key)) for key in keys))
    return wrap_not_cut(table)


def gpu_table(topo: Topology) -> Table:
    """One row per GPU: index, name, PCI bus id, NUMA node (``?`` marks a guessed one), HBM.

    >>> from allocators.declared_topology import load_declared
    >>> gpu_table(load_declared("paper-1aic")).row_count
    1
    """
    from rich.table import Table

    from allocators.table_width import wrap_not_cut

    table = Table(title="GPUs", title_justify="left")
    for header in ("gpu", "name", "pci bus id", "numa node", "hbm", "source"):
        table.add_column(header, justify="right" if header == "hbm" else "left")
    for gpu in topo.gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            gpu.pci_bus_id or "-",
            str(gpu.numa_node) + ("" if gpu.numa_node_known else " (?)"),
            format_bytes(gpu.total_bytes) if gpu.total_bytes else "unknown",
            gpu.source,
        )
    return wrap_not_cut(table)


def print_topology(topo: Topology, console: Console) -> None:
    """Print the node table, why each CPU-less node counts as CXL, known rates, the GPU table
    (or a line saying there is none) and the notes.

    >>> import io
    >>> from allocators.declared_topology import load_declared
    >>> from rich.console import Console
    >>> console = Console(file=io.StringIO(), width=120)
    >>> print_topology(load_declared("paper-1aic"), console)
    >>> "CXL #1" in console.file.getvalue()
    True
    """
    console.print(topology_table(topo))
    for node in topo.nodes:
        if node.cxl_evidence:
            console.print(
                f"node {node.id} ({node.kind}): {'; '.join(node.cxl_evidence)}", highlight=False
            )
    rates = rates_table(topo)
    if rates is not None:
        console.print(rates)
    if topo.gpus:
        console.print(gpu_table(topo))
    else:
        console.print("GPUs: none found")
    for note in topo.notes:
        console.print(f"note: {note}", highlight=False)


def _rate(rates: NodeRates, key: str) -> float | None:
    return getattr(rates, key)


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"
