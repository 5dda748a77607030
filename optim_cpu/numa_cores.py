"""Which CPU cores the optimizer's workers may run on: the cores of the NUMA node holding its state,
or a list of CPUs the caller names.

Reads /sys/devices/system/node/nodeN/cpulist (under a configurable root); it must not pin anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from allocators.cpu_lists import format_cpu_list, parse_cpu_list


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


def check_cpus(cpus: Iterable[int]) -> tuple[int, ...]:
    """The CPU ids in ``cpus``, sorted and once each, after checking this process may run on each.

    >>> first = min(os.sched_getaffinity(0))
    >>> check_cpus([first, first]) == (first,)
    True
    >>> check_cpus([-1])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: cpus = [-1] has -1, which is not a CPU id; write CPU ids from ...
    """
    allowed = sorted(os.sched_getaffinity(0))
    hint = f"write CPU ids from this process's allowed CPUs {format_cpu_list(allowed)}"
    if isinstance(cpus, (str, bytes)) or not isinstance(cpus, Iterable):
        raise ValueError(f"cpus = {cpus!r} is not a list of CPU ids; {hint}, e.g. cpus=[0, 1]")
    ids = list(cpus)
    if not ids:
        raise ValueError(f"cpus = [] names no CPU; {hint}, or pass None for the node's cores")
    for cpu in ids:
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 0:
            raise ValueError(f"cpus = {ids!r} has {cpu!r}, which is not a CPU id; {hint}")
    outside = sorted(set(ids) - set(allowed))
    if outside:
        raise ValueError(
            f"cpus = {ids!r}: CPU {format_cpu_list(outside)} is not allowed for this process "
            f"(its affinity mask); {hint}"
        )
    return tuple(sorted(set(ids)))


def worker_cpus(
    node: int | None, cpus: Iterable[int] | None, *, sysfs_root: str | Path = "/sys"
) -> tuple[int, ...]:
    """The CPUs to pin workers to: ``cpus`` when given (checked), else :func:`node_cpus` of ``node``.

    >>> worker_cpus(None, None) == node_cpus(None)
    True
    >>> worker_cpus(0, [0])
    Traceback (most recent call last):
    ValueError: numa_node = 0 and cpus = [0] both name where workers run; pass numa_node for a node's cores or cpus for an explicit list, not both
    """
    if cpus is None:
        return node_cpus(node, sysfs_root=sysfs_root)
    if node is not None:
        raise ValueError(
            f"numa_node = {node!r} and cpus = {cpus!r} both name where workers run; "
            "pass numa_node for a node's cores or cpus for an explicit list, not both"
        )
    return check_cpus(cpus)
