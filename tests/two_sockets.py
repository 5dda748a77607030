"""A topology tests share: two sockets with a GPU each, and a CXL node off each socket (2 near
socket 0, 3 near socket 1). Built from node templates so a test can give them rates."""

from __future__ import annotations

from dataclasses import replace

from allocators.topology import GpuInfo, NumaNode, Topology

GIB = 1 << 30
PLAIN_DRAM = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=64 * GIB, free_bytes=64 * GIB)
PLAIN_CXL = NumaNode(id=2, kind="cxl", cpus=(), total_bytes=128 * GIB, free_bytes=128 * GIB)


def two_sockets_two_cxl(
    dram: NumaNode = PLAIN_DRAM,
    cxl: NumaNode = PLAIN_CXL,
    cpus: tuple[tuple[int, ...], tuple[int, ...]] = ((0,), (1,)),
    source: str = "two sockets, two CXL",
) -> Topology:
    """Nodes 0 and 1 like ``dram`` (with ``cpus``), nodes 2 and 3 like ``cxl``; GPU i on node i."""
    nodes = (
        replace(dram, id=0, cpus=cpus[0]),
        replace(dram, id=1, cpus=cpus[1]),
        replace(cxl, id=2),
        replace(cxl, id=3),
    )
    distances = {
        0: {0: 10, 1: 21, 2: 14, 3: 24},
        1: {0: 21, 1: 10, 2: 24, 3: 14},
        2: {0: 14, 1: 24, 2: 10, 3: 28},
        3: {0: 24, 1: 14, 2: 28, 3: 10},
    }
    gpus = tuple(
        GpuInfo(i, "test gpu", f"0000:0{i}:00.0", i, True, 80 * GIB, "declared") for i in (0, 1)
    )
    return Topology(nodes=nodes, distances=distances, gpus=gpus, source=source)
