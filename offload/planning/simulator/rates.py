"""The tier-rate model of the step simulator: per node DMA rates (each direction) and CPU stream
rates, the GPU link, and the defaults taken from reference/PAPER.md where a machine says nothing.

It only turns declared or measured rates into numbers the simulator uses; it must not time anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from allocators.errors import ConfigError, OffloadError
from allocators.topology import NodeRates, NumaNode, Tiers, Topology

GIB = 1 << 30


class RateModelError(OffloadError, ValueError):
    """A node's rates are missing or not positive, so the simulator cannot use them."""


@dataclass(frozen=True)
class NodeSimRates:
    """The rates the simulator uses for one NUMA node, all in GiB/s.

    ``h2d``/``d2h`` are end-to-end DMA rates from a buffer wholly on this node to one GPU (what a
    profiler measures, so they already include the link). ``cpu`` is the rate at which the CPU
    optimizer's threads move bytes (reads plus writes) on this node. A node's time is shared by
    every stream that touches it: DMA in each direction and the CPU queue behind each other.

    >>> PAPER_RATES["cxl"].d2h_gib_per_s
    34.7
    """

    h2d_gib_per_s: float
    d2h_gib_per_s: float
    cpu_gib_per_s: float

    def __post_init__(self) -> None:
        for name in ("h2d_gib_per_s", "d2h_gib_per_s", "cpu_gib_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise RateModelError(f"{name} = {value!r} must be a positive rate in GiB/s")


# Bytes one AdamW element moves: reads param, grad, m, v (fp32); writes param, m, v.
ADAMW_NBYTES_PER_ELEMENT = 28

# Defaults for the paper's machine, by node kind (reference/PAPER.md, [bench] figures):
# - DMA: H2D/D2H at 2 GiB, one GPU: local DRAM 51.8/51.7, one CXL AIC 49.8/34.7.
# - CPU: the CPU AdamW table at 545M elements: local 545M / 54.8 ms = 9.95 G elem/s, CXL
#   545M / 228.8 ms = 2.38 G elem/s; times 28 bytes, 259.3 and 62.1 GiB/s. A stream benchmark's
#   read rate is not this: the card reads at about 46.6 GiB/s yet AdamW's read-write mix moves
#   62 GiB/s on it (the link is full duplex), so declared read/write rates are not used here.
PAPER_RATES: dict[str, NodeSimRates] = {
    "dram": NodeSimRates(51.8, 51.7, 259.3),
    "cxl": NodeSimRates(49.8, 34.7, 62.1),
}
# H2D and D2H at once reach 96 GB/s against 55 GB/s one way (reference/MEASURED.md): the link is
# full duplex at about 1.75x one direction.
DUPLEX_FACTOR = 96 / 55
# Small copies: about 5-6 us each regardless of placement (reference/PAPER.md).
COPY_LATENCY_S = 5.5e-6


@dataclass(frozen=True)
class SimRates:
    """Everything rate-like the simulator needs for one machine and one GPU.

    ``link_gib_per_s`` is one direction of the GPU's PCIe link: the fastest rate any node reaches.
    ``kinds`` maps node -> "dram"/"cxl"; ``notes`` lists every value that came from a default.
    ``cpu_device``: the device is the CPU itself, so a node's copy rate is its own limit (see
    :func:`host_device_rates`).

    >>> rates = paper_rates(cxl_nodes=2)
    >>> rates.link_gib_per_s, sorted(rates.nodes), rates.kinds[2]
    (51.8, [0, 1, 2], 'cxl')
    """

    nodes: dict[int, NodeSimRates]
    kinds: dict[int, str]
    link_gib_per_s: float
    duplex_gib_per_s: float
    copy_latency_s: float = COPY_LATENCY_S
    notes: tuple[str, ...] = field(default=())
    cpu_device: bool = False

    def dma_gib_per_s(self, node_id: int, direction: str) -> float:
        """What ``node_id`` itself sustains in one DMA direction, for all GPUs together.

        A node whose one-GPU rate reaches the link (within 2%) showed the link's limit, not its
        own: local DRAM serves two GPUs at 51.8 GiB/s each (reference/PAPER.md), so its own
        ceiling is taken as its memory bandwidth. A slower node (a CXL card) is its own limit.

        >>> rates = paper_rates(1)
        >>> rates.dma_gib_per_s(0, "h2d"), rates.dma_gib_per_s(1, "d2h")
        (259.3, 34.7)
        """
        r = self.node(node_id)
        one_gpu = r.h2d_gib_per_s if direction == "h2d" else r.d2h_gib_per_s
        if self.cpu_device:
            return one_gpu
        return r.cpu_gib_per_s if one_gpu >= 0.98 * self.link_gib_per_s else one_gpu

    def node(self, node_id: int) -> NodeSimRates:
        """Rates of ``node_id``, or a RateModelError naming the nodes known."""
        if node_id not in self.nodes:
            raise RateModelError(
                f"node {node_id} has no rates in this model; nodes with rates: {sorted(self.nodes)}"
            )
        return self.nodes[node_id]


def _node_rates(
    kind: str, measured: NodeRates, declared: NodeRates, adamw_elements_per_s: float | None
) -> tuple[NodeSimRates, list[str]]:
    default = PAPER_RATES["cxl" if kind == "cxl" else "dram"]
    given: dict[str, float] = {}
    for name in ("h2d_gib_per_s", "d2h_gib_per_s"):
        value = next(
            (v for v in (getattr(measured, name), getattr(declared, name)) if v is not None), None
        )
        if value is not None:
            given[name] = float(value)
    if adamw_elements_per_s is not None:
        given["cpu_gib_per_s"] = adamw_elements_per_s * ADAMW_NBYTES_PER_ELEMENT / GIB
    missing = [
        name for name in ("h2d_gib_per_s", "d2h_gib_per_s", "cpu_gib_per_s") if name not in given
    ]
    return replace(default, **given), missing


def sim_rates(
    nodes: Tiers | Topology | tuple[NumaNode, ...],
    overrides: Mapping[int, NodeRates] | None = None,
    adamw_elements_per_s: Mapping[int, float] | None = None,
) -> SimRates:
    """Build the rate model from a topology's nodes (declared YAML or sysfs) and their ``rates``;
    ``overrides`` (a profile's ``to_node_rates()``) and ``adamw_elements_per_s`` (a profile's
    measured CPU AdamW rate per node) win, field by field, where given.

    Rates a node does not give come from the paper's figures for its kind, and ``notes`` says so.

    >>> from allocators.topology import NumaNode, NodeRates
    >>> n0 = NumaNode(0, "dram", (0,), 1 << 30, 1 << 30, rates=NodeRates(h2d_gib_per_s=55.0))
    >>> r = sim_rates((n0,), adamw_elements_per_s={0: 2**30 / 28})
    >>> r.link_gib_per_s, r.nodes[0].d2h_gib_per_s, r.nodes[0].cpu_gib_per_s
    (55.0, 51.7, 1.0)
    """
    node_list = _node_list(nodes)
    if not node_list:
        raise RateModelError("no NUMA nodes given; pass a Topology, its Tiers or its nodes")
    overrides = overrides or {}
    adamw = adamw_elements_per_s or {}
    per_node: dict[int, NodeSimRates] = {}
    notes: list[str] = []
    for node in node_list:
        rates, missing = _node_rates(
            node.kind, overrides.get(node.id, NodeRates()), node.rates, adamw.get(node.id)
        )
        per_node[node.id] = rates
        if missing:
            notes.append(f"node {node.id} ({node.kind}): {', '.join(missing)} from the paper")
    link = max(max(r.h2d_gib_per_s, r.d2h_gib_per_s) for r in per_node.values())
    return SimRates(
        nodes=per_node,
        kinds={node.id: node.kind for node in node_list},
        link_gib_per_s=link,
        duplex_gib_per_s=link * DUPLEX_FACTOR,
        notes=tuple(notes),
    )


def _node_list(nodes: Tiers | Topology | tuple[NumaNode, ...]) -> tuple[NumaNode, ...]:
    if isinstance(nodes, Topology):
        return tuple(nodes.nodes)
    if isinstance(nodes, Tiers):
        return (*nodes.local_dram, *nodes.remote_dram, *nodes.cxl)
    return tuple(nodes)


def profile_rates(nodes: Tiers | Topology | tuple[NumaNode, ...], profile) -> SimRates:
    """``sim_rates`` with a measured profile's rates (an ``offload-profile`` MachineProfile: its
    ``to_node_rates()`` and each node's ``adamw_elements_per_s``) winning over the declared ones.

    >>> from types import SimpleNamespace
    >>> from allocators.topology import NumaNode
    >>> profile = SimpleNamespace(to_node_rates=lambda: {},
    ...                           nodes={0: SimpleNamespace(adamw_elements_per_s=2**30 / 28)})
    >>> profile_rates((NumaNode(0, "dram", (0,), 0, 0),), profile).nodes[0].cpu_gib_per_s
    1.0
    """
    known = {n.id for n in _node_list(nodes)}
    absent = sorted(set(profile.nodes) - known)
    if absent:
        # A profile of another machine (or a stale one) would plan with rates of nodes that
        # are not here, while the nodes that are here silently keep the paper's rates.
        raise ConfigError(
            f"the profile has rates for node(s) {absent}, which this topology lacks (its nodes: "
            f"{sorted(known)}); profile this machine (`offload-profile all`), or plan for the "
            "topology the profile was measured on"
        )
    adamw = {
        node: p.adamw_elements_per_s
        for node, p in profile.nodes.items()
        if p.adamw_elements_per_s is not None
    }
    return sim_rates(nodes, profile.to_node_rates(), adamw)


def load_rates(topology: Topology, profile: str | Path | None) -> SimRates:
    """The simulator's rates for ``topology``: those of ``profile`` (the path of an
    ``offload-profile`` JSON) over the topology's declared ones, else the declared ones alone.
    Every caller that turns a profile file into simulator rates goes through here.

    >>> from allocators.declared_topology import load_declared
    >>> load_rates(load_declared("paper-1aic"), None).nodes[1].d2h_gib_per_s > 0
    True
    >>> load_rates(load_declared("paper-1aic"), "/no/such.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    allocators.errors.ConfigError: profile = '/no/such.json': profile /no/such.json not found; ...
    """
    if profile is None:
        return sim_rates(topology)
    # Imported here: profilers sits beside offload, and only a profile needs it.
    from profilers.machine_profile import load_profile

    try:
        loaded = load_profile(profile)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"profile = {profile!r}: {exc}. Give the JSON `offload-profile all --out DIR` "
            "wrote, or drop the profile setting to plan with declared rates"
        ) from exc
    return profile_rates(topology, loaded)


def paper_rates(cxl_nodes: int = 1) -> SimRates:
    """The paper's machine from its own figures: node 0 local DRAM, nodes 1..k one CXL AIC each.

    >>> paper_rates(1).nodes[1].h2d_gib_per_s
    49.8
    """
    nodes = (NumaNode(0, "dram", (0,), 0, 0),) + tuple(
        NumaNode(i, "cxl", (), 0, 0) for i in range(1, cxl_nodes + 1)
    )
    return replace(sim_rates(nodes), notes=("all rates from reference/PAPER.md",))


def memcpy_gib_per_s(read_gib_per_s: float, write_gib_per_s: float) -> float:
    """The rate of a copy made by the CPU within one node: each byte is read and then written on
    the same memory, so the two stream rates add up in time (harmonically).

    >>> memcpy_gib_per_s(10.0, 10.0)
    5.0
    """
    for name, value in (("read_gib_per_s", read_gib_per_s), ("write_gib_per_s", write_gib_per_s)):
        if not (isinstance(value, (int, float)) and value > 0):
            raise RateModelError(f"{name} = {value!r} must be a positive rate in GiB/s")
    return 1.0 / (1.0 / read_gib_per_s + 1.0 / write_gib_per_s)


def host_device_rates(
    copy_gib_per_s: float, cpu_gib_per_s: float, node_id: int = 0, kind: str = "dram"
) -> SimRates:
    """Rates for a run whose device is the CPU itself (no GPU): a "DMA" is a memcpy on
    ``node_id`` at ``copy_gib_per_s`` in either direction, the link is that copy (no PCIe, and no
    duplex gain: both directions share the node's memory), and the optimizer moves its bytes at
    ``cpu_gib_per_s``.

    >>> r = host_device_rates(copy_gib_per_s=8.0, cpu_gib_per_s=4.0)
    >>> r.link_gib_per_s, r.duplex_gib_per_s, r.dma_gib_per_s(0, "h2d")
    (8.0, 8.0, 8.0)
    """
    rates = NodeSimRates(copy_gib_per_s, copy_gib_per_s, cpu_gib_per_s)
    return SimRates(
        nodes={node_id: rates},
        kinds={node_id: kind},
        link_gib_per_s=copy_gib_per_s,
        duplex_gib_per_s=copy_gib_per_s,
        copy_latency_s=0.0,
        notes=(f"node {node_id}: the device is the CPU; copies are memcpy on the node",),
        cpu_device=True,
    )
