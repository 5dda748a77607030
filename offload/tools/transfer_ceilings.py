"""The transfer ceilings a run's H2D/D2H rates are drawn and reported against: the measured
profile's rates, else the topology's declared ones, over the nodes in use. No measuring here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from allocators.topology import Topology

GB_PER_GIB = (1 << 30) / 1e9


@dataclass(frozen=True)
class TransferCeilings:
    """The best H2D and D2H rates (GB/s) measured or declared for the nodes in use, and where
    they came from; None where nothing is known."""

    h2d_gb_per_s: float | None
    d2h_gb_per_s: float | None
    source: str | None


def transfer_ceilings(
    topology: Topology, profile: str | None, nodes: Iterable[int]
) -> TransferCeilings:
    """The ceilings the dashboard draws rates against: ``profile``'s measured rates (an
    ``offload-profile`` JSON) if given, else the topology's declared NodeRates, over ``nodes``.

    The best node is the ceiling: one link carries every copy, whichever node it reads.

    >>> from allocators.topology import NodeRates, NumaNode
    >>> node = NumaNode(0, "dram", (0,), 1 << 30, 1 << 30, rates=NodeRates(h2d_gib_per_s=50.0))
    >>> topo = Topology(nodes=(node,), distances={}, gpus=(), source="declared:x.yaml")
    >>> ceilings = transfer_ceilings(topo, None, [0])
    >>> round(ceilings.h2d_gb_per_s, 2), ceilings.d2h_gb_per_s, ceilings.source
    (53.69, None, 'declared rates (declared:x.yaml)')
    """
    nodes = set(nodes)
    if profile is not None:
        # Imported here: profilers sits beside offload, and only this setting needs it.
        from profilers.machine_profile import load_profile

        rates = load_profile(profile).to_node_rates()
        source = f"profile {profile}"
    else:
        rates = {node.id: node.rates for node in topology.nodes}
        source = f"declared rates ({topology.source})"
    used = [r for node, r in rates.items() if node in nodes]
    h2d = _best(r.h2d_gib_per_s for r in used)
    d2h = _best(r.d2h_gib_per_s for r in used)
    if h2d is None and d2h is None:
        return TransferCeilings(None, None, None)
    return TransferCeilings(h2d, d2h, source)


def _best(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) * GB_PER_GIB if known else None
