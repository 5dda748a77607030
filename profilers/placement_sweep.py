"""Which placements a sweep visits: every node alone, then local:CXL mixes when CXL nodes exist.

Only the list of placements lives here; measuring them is the benchmarks' job.
"""

from __future__ import annotations

from collections.abc import Sequence

from allocators.placement import Placement, as_placement
from allocators.topology import Topology

# local:CXL weights from the paper's weighted-interleave sweep (1:1 up to 1:4).
CXL_RATIOS = (1, 2, 4)


def sweep_placements(
    topology: Topology, nodes: Sequence[int], ratios: Sequence[int] = CXL_RATIOS
) -> tuple[Placement, ...]:
    """Each of ``nodes`` alone, then local DRAM : each CXL node at ``1:r`` for r in ``ratios``.

    >>> from allocators.topology import NumaNode
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 30, free_bytes=1 << 30)
    >>> cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 30, free_bytes=1 << 30)
    >>> topo = Topology(nodes=(dram, cxl), distances={}, gpus=(), source="example")
    >>> [str(p) for p in sweep_placements(topo, [0, 1], ratios=(1, 2))]
    ['node0:1', 'node1:1', 'node0:0.5 + node1:0.5', 'node0:0.333 + node1:0.667']
    """
    singles = [as_placement(node) for node in nodes]
    tiers = topology.tiers
    if not tiers.local_dram:
        return tuple(singles)
    local = tiers.local_dram[0].id
    mixes = [
        as_placement([(local, 1), (cxl.id, ratio)])
        for cxl in tiers.cxl
        if cxl.id in nodes and local in nodes
        for ratio in ratios
    ]
    return tuple(singles + mixes)
