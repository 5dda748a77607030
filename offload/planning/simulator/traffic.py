"""Memory-side time of a phase: bytes each node moves by DMA (each direction) and by the CPU, limited
by the GPU link and by each node's ceilings, with a node's time shared by all streams that touch it.

Pure arithmetic over a SimRates; it must not know about models, groups or policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from allocators.placement import Placement
from offload.planning.simulator.rates import GIB, SimRates


@dataclass
class Traffic:
    """Bytes per node moved in one phase: ``h2d``/``d2h`` by DMA, ``cpu`` by the CPU optimizer's
    threads (reads plus writes). ``gpus`` GPUs each run the same DMA streams over their own link.

    >>> t = Traffic()
    >>> t.add("h2d", 100, Placement(((0, 0.5), (1, 0.5))))
    >>> t.h2d
    {0: 50.0, 1: 50.0}
    """

    h2d: dict[int, float] = field(default_factory=dict)
    d2h: dict[int, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)
    gpus: int = 1

    def add(self, kind: str, nbytes: float, placement: Placement) -> None:
        """Charge ``nbytes`` of ``kind`` (h2d, d2h or cpu) to a placement's nodes."""
        per_node = getattr(self, kind)
        for node, fraction in placement.shares:
            per_node[node] = per_node.get(node, 0.0) + nbytes * fraction

    def merged(self, other: Traffic) -> Traffic:
        """Both phases' bytes on the same nodes (what overlapping two phases shares).

        >>> a, b = Traffic(cpu={0: 1.0}), Traffic(cpu={0: 2.0, 1: 1.0})
        >>> a.merged(b).cpu
        {0: 3.0, 1: 1.0}
        """

        def add(x: Mapping[int, float], y: Mapping[int, float]) -> dict[int, float]:
            return {n: x.get(n, 0.0) + y.get(n, 0.0) for n in sorted({*x, *y})}

        return Traffic(
            h2d=add(self.h2d, other.h2d),
            d2h=add(self.d2h, other.d2h),
            cpu=add(self.cpu, other.cpu),
            gpus=max(self.gpus, other.gpus),
        )


@dataclass(frozen=True)
class MemoryTime:
    """The memory-side bound of a phase and what sets it (``"link h2d"``, ``"node 1"``, ...)."""

    seconds: float
    bottleneck: str


def node_busy_seconds(traffic: Traffic, rates: SimRates, node: int) -> float:
    """Seconds ``node`` is busy serving every stream of a phase: its DMA in each direction (from all
    GPUs) and the CPU's bytes queue behind each other on the one device.

    >>> from offload.planning.simulator.rates import paper_rates
    >>> round(node_busy_seconds(Traffic(d2h={1: 34.7 * GIB}), paper_rates(1), 1), 6)
    1.0
    """
    return (
        traffic.gpus * traffic.h2d.get(node, 0.0) / (rates.dma_gib_per_s(node, "h2d") * GIB)
        + traffic.gpus * traffic.d2h.get(node, 0.0) / (rates.dma_gib_per_s(node, "d2h") * GIB)
        + traffic.cpu.get(node, 0.0) / (rates.node(node).cpu_gib_per_s * GIB)
    )


def memory_seconds(traffic: Traffic, rates: SimRates) -> MemoryTime:
    """The time a phase's memory traffic needs at best: the slowest of the link (each direction,
    and both at once) and of every node, since a striped buffer's nodes work in parallel and the
    stream waits for the node that carries the most for its speed.

    >>> from offload.planning.simulator.rates import paper_rates
    >>> from allocators.placement import interleave
    >>> t = Traffic(); t.add("d2h", 2 * GIB, interleave([0, 1]))
    >>> m = memory_seconds(t, paper_rates(1))
    >>> m.bottleneck, round(2 / m.seconds, 1)
    ('link d2h', 51.8)
    """
    link = rates.link_gib_per_s * GIB
    h2d_total = sum(traffic.h2d.values())
    d2h_total = sum(traffic.d2h.values())
    bounds = {
        "link h2d": h2d_total / link,
        "link d2h": d2h_total / link,
        "link duplex": (h2d_total + d2h_total) / (rates.duplex_gib_per_s * GIB),
    }
    nodes = sorted({*traffic.h2d, *traffic.d2h, *traffic.cpu})
    bounds.update({f"node {n}": node_busy_seconds(traffic, rates, n) for n in nodes})
    bottleneck = max(bounds, key=bounds.__getitem__)
    return MemoryTime(bounds[bottleneck], bottleneck)


def copy_seconds(
    nbytes: float, placement: Placement, direction: str, rates: SimRates, gpus: int = 1
) -> float:
    """One copy of ``nbytes`` between a buffer placed as ``placement`` and each of ``gpus`` GPUs at
    once: a fixed per-copy latency plus the streaming time (the DMA microbenchmark's model).

    >>> from offload.planning.simulator.rates import paper_rates
    >>> from allocators.placement import as_placement
    >>> round(2 * GIB / copy_seconds(2 * GIB, as_placement(1), "d2h", paper_rates(1)) / GIB, 1)
    34.7
    """
    if direction not in ("h2d", "d2h"):
        raise ValueError(f"direction {direction!r} is not a DMA direction; write 'h2d' or 'd2h'")
    traffic = Traffic(gpus=gpus)
    traffic.add(direction, nbytes, placement)
    return rates.copy_latency_s + memory_seconds(traffic, rates).seconds
