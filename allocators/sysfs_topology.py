"""Read the machine's NUMA nodes, distances, memory tiers, CXL regions and movable zones from a
sysfs tree (the live /sys or a captured copy). Reads files only; must not allocate or bind memory.

Movable zones come from the memory blocks (``nodeN/memoryM/state`` and ``valid_zones``): for an
online block the kernel prints the one zone it sits in, so a node is ``movable_only`` when it has
online blocks and every one of them says ``Movable``. ``/proc/zoneinfo`` would say the same but
lives outside sysfs, so a captured tree could not carry it.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from allocators.cpu_lists import format_cpu_list, parse_cpu_list
from allocators.errors import TopologyError
from allocators.gpu_discovery import discover_gpus
from allocators.sysfs_files import is_live, read_int, read_text
from allocators.topology import NodeRates, NumaNode, Topology

_MEMINFO_RE = re.compile(r"^Node\s+\d+\s+(\w+):\s+(\d+)\s*kB", re.MULTILINE)


@dataclass(frozen=True)
class _CxlEvidence:
    by_node: dict[int, tuple[str, ...]]
    memdevs: tuple[str, ...]


def discover(sysfs_root: str | Path = "/sys", *, use_nvml: bool = True) -> Topology:
    """Build the Topology of the machine whose sysfs is at ``sysfs_root``.

    Nodes without memory (CPU-only, memoryless) are left out and named in ``notes``; a node with
    memory and no CPUs is ``kind="cxl"``. Missing files give defaults and a note; a root that is
    not a sysfs tree raises TopologyError. NVML is asked only for the live ``/sys``.

    >>> root = Path(__file__).parents[1] / "tests/fixtures/sysfs/one-socket-one-cxl"
    >>> topo = discover(root)
    >>> [(n.id, n.kind) for n in topo.nodes]
    [(0, 'dram'), (1, 'cxl')]
    """
    root = Path(sysfs_root)
    if not root.is_dir():
        raise TopologyError(
            f"sysfs root {str(root)!r} is not a directory; pass /sys or a captured copy of it "
            f"(a directory holding devices/system/node/node0/)"
        )
    notes: list[str] = []
    node_root = root / "devices" / "system" / "node"
    if node_root.is_dir():
        nodes, distances = _read_numa_nodes(root, node_root, notes)
    elif (root / "devices" / "system" / "cpu").is_dir():
        nodes, distances = _read_single_node(root, notes)
    else:
        raise TopologyError(
            f"{str(root)!r} is not a sysfs tree: expected {node_root}/node0/ (NUMA nodes) or "
            f"{root / 'devices' / 'system' / 'cpu'}; pass /sys or a captured copy of it"
        )
    found = discover_gpus(root, cpu_node_ids=[n.id for n in nodes if n.has_cpus], use_nvml=use_nvml)
    return Topology(
        nodes=nodes,
        distances=distances,
        gpus=found.gpus,
        source=f"sysfs:{root}",
        name=platform.node() if is_live(root) else root.name,
        notes=tuple(notes) + found.notes,
    )


def _read_numa_nodes(
    root: Path, node_root: Path, notes: list[str]
) -> tuple[tuple[NumaNode, ...], dict[int, dict[int, int]]]:
    present = sorted(
        int(p.name[4:]) for p in node_root.glob("node*") if p.name[4:].isdigit() and p.is_dir()
    )
    if not present:
        raise TopologyError(
            f"{node_root} holds no node<N>/ directories; expected at least node0/ with cpulist "
            f"and meminfo (is {str(root)!r} a sysfs tree?)"
        )
    online = _read_list(node_root / "online")
    if online is None:
        notes.append(f"{node_root}/online missing: assumed every node directory is online")
        online = tuple(present)
    with_memory = _read_list(node_root / "has_memory")
    tier_of = _memory_tiers(root, notes)
    cxl = _cxl_evidence(root)
    distances: dict[int, dict[int, int]] = {}
    nodes: list[NumaNode] = []
    missing_blocks: list[int] = []
    for node_id in present:
        path = node_root / f"node{node_id}"
        if node_id not in online:
            notes.append(f"node {node_id} is offline: skipped")
            continue
        row = _distance_row(path, online, notes)
        if row:
            distances[node_id] = row
        cpus = _read_list(path / "cpulist")
        if cpus is None:
            notes.append(f"node {node_id}: cpulist missing, assumed no CPUs")
            cpus = ()
        total_bytes, free_bytes = _meminfo(path, notes)
        has_memory = node_id in with_memory if with_memory is not None else total_bytes > 0
        if not has_memory:
            what = (
                f"CPUs {format_cpu_list(cpus)} but no memory" if cpus else "no CPUs and no memory"
            )
            notes.append(f"node {node_id} has {what}: not a memory tier, skipped")
            continue
        movable_only, blocks = _movable_only(path)
        if not blocks:
            missing_blocks.append(node_id)
        nodes.append(
            NumaNode(
                id=node_id,
                kind="dram" if cpus else "cxl",
                cpus=cpus,
                total_bytes=total_bytes,
                free_bytes=free_bytes,
                movable_only=movable_only,
                memory_tier=tier_of.get(node_id),
                cxl_evidence=cxl.by_node.get(node_id, ()),
                rates=_hmat_rates(path),
            )
        )
    if with_memory is None:
        notes.append(f"{node_root}/has_memory missing: nodes with MemTotal > 0 count as memory")
    if missing_blocks:
        notes.append(
            f"no online memory blocks under node{{{format_cpu_list(missing_blocks)}}}/memory*: "
            f"movable zones unknown, assumed not movable"
        )
    if not nodes:
        raise TopologyError(f"no NUMA node under {node_root} has memory; nothing to place on")
    nodes = _label_far_memory(nodes, cxl, notes)
    if any(n.rates != NodeRates() for n in nodes):
        notes.append(
            "rates from firmware HMAT (node*/access1/initiators): the platform's claim, not a "
            "measurement"
        )
    return tuple(nodes), distances


def _label_far_memory(nodes: list[NumaNode], cxl: _CxlEvidence, notes: list[str]) -> list[NumaNode]:
    """Add the memory-tier and no-CPU evidence to CPU-less nodes and explain odd cases in notes."""
    cpu_tiers = [n.memory_tier for n in nodes if n.has_cpus and n.memory_tier is not None]
    dram_tier = min(cpu_tiers, default=None)
    labelled = []
    for node in nodes:
        if node.has_cpus:
            if node.cxl_evidence:
                notes.append(
                    f"node {node.id} has CPUs and also CXL memory ({', '.join(node.cxl_evidence)}):"
                    f" its memory is a mix, treated as DRAM"
                )
            labelled.append(node)
            continue
        evidence = ["no CPUs", *node.cxl_evidence]
        if node.memory_tier is not None and dram_tier is not None and node.memory_tier > dram_tier:
            evidence.append(f"slower memory tier {node.memory_tier} (CPU nodes: {dram_tier})")
        if not node.cxl_evidence:
            notes.append(
                f"node {node.id} has memory but no CPUs and no CXL region in bus/cxl: treated as "
                f"CXL/far memory (it could also be HBM or persistent memory)"
            )
        labelled.append(dataclasses.replace(node, cxl_evidence=tuple(evidence)))
    mapped = {n for n, ev in cxl.by_node.items() if ev}
    if cxl.memdevs and not mapped:
        notes.append(
            f"CXL memory devices {', '.join(cxl.memdevs)} present but no region maps to a NUMA "
            f"node (not configured as system RAM?)"
        )
    stray = sorted(mapped - {n.id for n in nodes})
    if stray:
        notes.append(f"CXL regions point at nodes {stray}, which have no online memory")
    return labelled


def _read_single_node(
    root: Path, notes: list[str]
) -> tuple[tuple[NumaNode, ...], dict[int, dict[int, int]]]:
    """A kernel built without NUMA has no devices/system/node: one node 0 holds everything."""
    cpus = _read_list(root / "devices" / "system" / "cpu" / "online") or ()
    memory = root / "devices" / "system" / "memory"
    block_nbytes = read_int(memory / "block_size_bytes", base=16)
    blocks = [b for b in memory.glob("memory[0-9]*") if read_text(b / "state") == "online"]
    total_bytes = (block_nbytes or 0) * len(blocks)
    notes.append(
        "no devices/system/node (kernel without NUMA): one node 0 with every online CPU; "
        + (
            "size from online memory blocks, free memory unknown (shown as the size)"
            if total_bytes
            else "size unknown (shown as 0)"
        )
    )
    node = NumaNode(id=0, kind="dram", cpus=cpus, total_bytes=total_bytes, free_bytes=total_bytes)
    return (node,), {0: {0: 10}}


def _distance_row(path: Path, online: tuple[int, ...], notes: list[str]) -> dict[int, int]:
    """The kernel prints one distance per online node, in node order."""
    text = read_text(path / "distance")
    node_id = int(path.name[4:])
    if text is None:
        notes.append(f"node {node_id}: distance missing, assumed 10 local / 20 remote")
        return {}
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != len(online):
        notes.append(
            f"node {node_id}: distance {text!r} does not have one entry per online node "
            f"{list(online)}; assumed 10 local / 20 remote"
        )
        return {}
    return dict(zip(online, values, strict=True))


def _meminfo(path: Path, notes: list[str]) -> tuple[int, int]:
    text = read_text(path / "meminfo")
    fields = {k: int(v) * 1024 for k, v in _MEMINFO_RE.findall(text or "")}
    if "MemTotal" not in fields:
        notes.append(f"node {path.name[4:]}: meminfo missing or unreadable, size taken as 0")
        return 0, 0
    if "MemFree" not in fields:
        notes.append(f"node {path.name[4:]}: MemFree missing, free taken as the whole node")
    return fields["MemTotal"], fields.get("MemFree", fields["MemTotal"])


def _movable_only(path: Path) -> tuple[bool, int]:
    """(all online blocks are Movable, number of online blocks); offline blocks hold no memory."""
    zones = []
    for block in path.glob("memory[0-9]*"):
        state = read_text(block / "state")
        valid = read_text(block / "valid_zones")
        if valid is None or (state is not None and state != "online"):
            continue
        # "none" means the block spans zones (e.g. DMA32 + Normal): not movable.
        zones.append(valid.split()[0] if valid.split() else "none")
    return bool(zones) and all(z == "Movable" for z in zones), len(zones)


def _memory_tiers(root: Path, notes: list[str]) -> dict[int, int]:
    tiering = root / "devices" / "virtual" / "memory_tiering"
    if not tiering.is_dir():
        notes.append("no kernel memory tiers (devices/virtual/memory_tiering absent; kernel < 6.1)")
        return {}
    tier_of = {}
    for tier in tiering.glob("memory_tier*"):
        suffix = tier.name.removeprefix("memory_tier")
        if not suffix.isdigit():
            continue
        for node_id in _read_list(tier / "nodelist") or ():
            tier_of[node_id] = int(suffix)
    return tier_of


def _cxl_evidence(root: Path) -> _CxlEvidence:
    """Which node each CXL region's memory became, via regionN/dax_regionN/daxN.M/target_node.

    ``target_node`` is the node the memory is onlined as; a dax device's ``numa_node`` is only
    used when target_node is absent (before onlining it names the nearest CPU node).
    """
    devices = root / "bus" / "cxl" / "devices"
    by_node: dict[int, list[str]] = {}
    for region in sorted(devices.glob("region[0-9]*")):
        for dax in sorted(region.glob("dax_region*/dax*")):
            node = read_int(dax / "target_node")
            if node is None:
                node = read_int(dax / "numa_node")
            if node is not None and node >= 0:
                by_node.setdefault(node, []).append(f"cxl {region.name}/{dax.name}")
    memdevs = tuple(sorted(p.name for p in devices.glob("mem[0-9]*")))
    return _CxlEvidence(by_node={k: tuple(v) for k, v in by_node.items()}, memdevs=memdevs)


def _hmat_rates(path: Path) -> NodeRates:
    """Firmware (HMAT) rates seen from CPU initiators (access1), else from any (access0).

    The kernel gives latency in ns and bandwidth in MiB/s; 0 means not reported.
    """
    for access in ("access1", "access0"):
        initiators = path / access / "initiators"
        if not initiators.is_dir():
            continue
        latency = read_int(initiators / "read_latency")
        read = read_int(initiators / "read_bandwidth")
        write = read_int(initiators / "write_bandwidth")
        return NodeRates(
            latency_ns=float(latency) if latency else None,
            read_gib_per_s=read / 1024 if read else None,
            write_gib_per_s=write / 1024 if write else None,
        )
    return NodeRates()


def _read_list(path: Path) -> tuple[int, ...] | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return parse_cpu_list(text, what=str(path))
    except ValueError as exc:
        raise TopologyError(str(exc)) from None
