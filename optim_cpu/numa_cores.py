"""Which CPU cores the optimizer's workers may run on: the cores of the NUMA node holding its state.

Reads /sys/devices/system/node/nodeN/cpulist (under a configurable root); it must not pin anything.
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Return the sorted CPU ids in a kernel list such as ``"0-3,8"``.

    >>> parse_cpulist("0-3,8\\n")
    (0, 1, 2, 3, 8)
    >>> parse_cpulist("")
    ()
    """
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part.strip():
            continue
        low, sep, high = part.strip().partition("-")
        try:
            ids.update(range(int(low), int(high if sep else low) + 1))
        except ValueError as exc:
            raise ValueError(f"cpu list {text.strip()!r} is not like '0-3,8'") from exc
    return tuple(sorted(ids))


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
    cpus = tuple(c for c in parse_cpulist(cpulist.read_text()) if c in allowed)
    return cpus or allowed
