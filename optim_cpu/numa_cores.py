"""Which CPU cores the optimizer's workers may run on: the cores of the NUMA node holding its state.

Reads /sys/devices/system/node/nodeN/cpulist (under a configurable root); it must not pin anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from allocators.cpu_lists import parse_cpu_list


def node_cpus(node: int | None, *, sysfs_root: str | Path = "/sys") -> tuple[int, ...]:
    """CPUs this process may use on NUMA node ``node``; all allowed CPUs for None or a CPU-less node.

    A CPU-less node (a CXL expander) has no cores of its own, and a machine without a NUMA sysfs
    tree has one node, so both fall back to every CPU in the process's affinity mask.

    >>> node_cpus(None) == tuple(sorted(os.sched_getaffinity(0)))
    True
    """
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    if node is None:
        return allowed
    if isinstance(node, bool) or not isinstance(node, int) or node < 0:
        raise ValueError(f"numa_node = {node!r} is not a NUMA node id; write an int >= 0 or None")
    nodes_dir = Path(sysfs_root) / "devices" / "system" / "node"
    if not nodes_dir.is_dir():
        return allowed
    cpulist = nodes_dir / f"node{node}" / "cpulist"
    if not cpulist.exists():
        present = sorted(p.name for p in nodes_dir.glob("node[0-9]*"))
        raise ValueError(
            f"NUMA node {node} does not exist ({cpulist} is missing); nodes: {present}"
        )
    cpus = tuple(c for c in parse_cpu_list(cpulist.read_text(), what=str(cpulist)) if c in allowed)
    return cpus or allowed
