"""Reduce result rows to the per-node rates of the profile, and assemble the profile itself.

Only the choice of which row stands for a node's rate lives here; it must not measure anything.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Sequence

from allocators.topology import Topology
from allocators.topology_json import topology_to_dict
from profilers.machine_info import collect_machine, collect_versions
from profilers.machine_profile import MachineProfile, NodeProfile
from profilers.result_row import ResultRow

_SINGLE_NODE = re.compile(r"^node(\d+)$")


def _node(row: ResultRow) -> int | None:
    match = _SINGLE_NODE.match(row.placement)
    return int(match.group(1)) if match else None


def _pick(rows: list[ResultRow], benchmark: str, case: str, **match: object) -> list[ResultRow]:
    return [
        r
        for r in rows
        if r.benchmark == benchmark
        and r.case == case
        and all(getattr(r, k) == v for k, v in match.items())
    ]


def _lowest(rows: list[ResultRow]) -> float | None:
    return min((r.median for r in rows), default=None)


def _highest(rows: list[ResultRow]) -> float | None:
    return max((r.median for r in rows), default=None)


def _at_largest(rows: list[ResultRow]) -> list[ResultRow]:
    largest = max((r.nbytes for r in rows), default=0)
    return [r for r in rows if r.nbytes == largest]


def node_rates(rows: Iterable[ResultRow]) -> dict[int, NodeProfile]:
    """Per-node rates from single-node rows; mixes and emulated rows are left out.

    >>> from profilers.trial_stats import TrialStats
    >>> s = TrialStats(120.0, 118.0, 125.0, 5, False)
    >>> rows = [ResultRow.from_stats("latency", "chase", "node0", 1 << 30, "ns", s, page_size="4KiB")]
    >>> node_rates(rows)[0].latency_ns
    120.0
    """
    by_node: dict[int, list[ResultRow]] = {}
    for row in rows:
        node = _node(row)
        if node is not None and not row.emulated:
            by_node.setdefault(node, []).append(row)
    result = {}
    for node, node_rows in sorted(by_node.items()):
        pick = functools.partial(_pick, node_rows)
        result[node] = NodeProfile(
            latency_ns=_lowest(_at_largest(pick("latency", "chase"))),
            read_gib_per_s=_highest(pick("memory", "read")),
            write_gib_per_s=_highest(pick("memory", "write")),
            h2d_gib_per_s=_highest(
                _at_largest(pick("bandwidth", "h2d", memory="pinned", streams=1))
            ),
            d2h_gib_per_s=_highest(
                _at_largest(pick("bandwidth", "d2h", memory="pinned", streams=1))
            ),
            prefault_s_per_gib=_lowest(pick("pinning", "allocate+prefault")),
            pin_s_per_gib=_lowest(pick("pinning", "allocate+prefault+register")),
            adamw_elements_per_s=_elements_per_s(_largest_elements(pick("optimizer", "adamw"))),
            dma_share_during_step=_share(
                pick("contention", "dma + adamw"), pick("contention", "dma idle")
            ),
        )
    return result


def _share(during: list[ResultRow], alone: list[ResultRow]) -> float | None:
    """Rate while something else ran over the rate alone (the lowest pair, same size)."""
    shares = [
        d.median / a.median for d in during for a in alone if a.nbytes == d.nbytes and a.median > 0
    ]
    return min(shares, default=None)


def _largest_elements(rows: list[ResultRow]) -> list[ResultRow]:
    largest = max((r.elements for r in rows), default=0)
    return [r for r in rows if r.elements == largest]


def _elements_per_s(rows: list[ResultRow]) -> float | None:
    # Step time is in ms; the fastest kernel measured stands for the node.
    rates = [r.elements / (r.median / 1e3) for r in rows if r.median > 0]
    return max(rates, default=None)


def build_profile(
    rows: Sequence[ResultRow],
    topology: Topology,
    *,
    skipped: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> MachineProfile:
    """A MachineProfile of this machine from the rows of one run.

    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 30, free_bytes=1 << 29)
    >>> topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="example")
    >>> build_profile([], topo).schema
    'offload-profile/1'
    """
    kernels = sorted({r.kernel for r in rows if r.benchmark in ("latency", "memory")})
    return MachineProfile(
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=collect_machine(),
        versions=collect_versions(),
        topology=topology_to_dict(topology),
        nodes=node_rates(rows),
        kernel="+".join(kernels) or "none",
        degraded=any(r.degraded for r in rows),
        skipped=tuple(skipped),
        notes=tuple(notes),
    )
