"""A Topology as plain JSON-ready data, for `topology --json` and for files other tools read.

Only the conversion to dicts lives here; it must not read the machine or print anything.
"""

from __future__ import annotations

import dataclasses

from allocators.topology import Topology

DUMP_FORMAT = "offload-topology-dump/1"


def topology_to_dict(topo: Topology) -> dict:
    """Nodes, distances (string keys, as JSON needs), GPUs, tiers as seen from GPU 0, and notes.

    >>> from allocators.topology import NumaNode
    >>> node = NumaNode(id=0, kind="dram", cpus=(0, 1), total_bytes=1 << 30, free_bytes=1 << 29)
    >>> d = topology_to_dict(Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="x"))
    >>> d["nodes"][0]["cpus"], d["distances"], d["tiers"]["local_dram"]
    ([0, 1], {'0': {'0': 10}}, [0])
    """
    tiers = topo.tiers
    return {
        "format": DUMP_FORMAT,
        "name": topo.name,
        "source": topo.source,
        "nodes": [_plain(dataclasses.asdict(n)) for n in topo.nodes],
        "distances": {
            str(a): {str(b): d for b, d in sorted(row.items())}
            for a, row in sorted(topo.distances.items())
        },
        "gpus": [_plain(dataclasses.asdict(g)) for g in topo.gpus],
        "tiers": {
            "hbm": [g.index for g in tiers.hbm],
            "local_dram": [n.id for n in tiers.local_dram],
            "remote_dram": [n.id for n in tiers.remote_dram],
            "cxl": [n.id for n in tiers.cxl],
        },
        "notes": list(topo.notes),
    }


def _plain(value):
    """Tuples become lists so the dict compares equal to what json.loads gives back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
