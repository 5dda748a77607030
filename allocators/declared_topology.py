"""Load a machine we cannot see from a declared YAML file (schema ``offload-topology/1``): nodes,
capacities, optional rates, distances and GPUs. Validates and builds a Topology; must not read sysfs.

Example file (the shipped ones are in allocators/topologies/)::

    schema: offload-topology/1
    name: my-box
    nodes:
      - {id: 0, kind: dram, cpus: "0-31", capacity: 256GiB}
      - {id: 1, kind: cxl, capacity: 128GiB, rates: {latency_ns: 250, h2d_gib_per_s: 49.8}}
    gpus:
      - {index: 0, name: H100, numa_node: 0, hbm: 80GiB}
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path

from allocators.cpu_lists import parse_cpu_list
from allocators.errors import TopologyError
from allocators.topology import GpuInfo, NodeRates, NumaNode, Topology
from allocators.units import parse_size
from allocators.yaml_text import load_yaml, yaml_problem

SCHEMA = "offload-topology/1"
SHIPPED_DIR = Path(__file__).parent / "topologies"

# SLIT values used when a file gives no matrix; they are what servers with CXL expanders report
# (a CPU node to the card on its own socket 14, to a card on the other socket 24, card to card 26).
LOCAL_DISTANCE = 10
REMOTE_DRAM_DISTANCE = 21
CXL_HOME_DISTANCE = 14
CXL_FAR_DISTANCE = 24
CXL_TO_CXL_DISTANCE = 26

_TOP_KEYS = ("schema", "name", "nodes", "distances", "gpus", "notes")
_NODE_KEYS = (
    "id",
    "kind",
    "cpus",
    "capacity",
    "free",
    "movable_only",
    "memory_tier",
    "attached_to",
    "rates",
)
_RATE_KEYS = tuple(f.name for f in fields(NodeRates))
_GPU_KEYS = ("index", "name", "numa_node", "hbm", "pci_bus_id")


@dataclass(frozen=True)
class _Where:
    """The file being read, so every message starts with it."""

    source: str

    def fail(self, message: str) -> TopologyError:
        return TopologyError(f"{self.source}: {message}")


def shipped_topologies() -> tuple[str, ...]:
    """Names of the topology files shipped with the package, usable as ``load_declared(name)``.

    >>> "paper-1aic" in shipped_topologies()
    True
    """
    return tuple(sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")))


def load_declared(path_or_name: str | Path) -> Topology:
    """Read a declared topology from a YAML file, or a shipped one by short name.

    Raises TopologyError naming the key path and what to write instead, e.g.
    ``nodes[2].capacity = '64 gigs' is not a size; write '64GiB' ...``.

    >>> topo = load_declared("paper-1aic")
    >>> [(n.id, n.kind) for n in topo.nodes], topo.gpus[0].numa_node
    ([(0, 'dram'), (1, 'cxl')], 0)
    """
    path = _resolve(path_or_name)
    where = _Where(path.name)
    try:
        data = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise where.fail(f"cannot be read as a text file ({exc}); give a UTF-8 YAML file") from None
    except Exception as exc:  # PyYAML raises more than YAMLError on odd tags ('!!int' alone)
        raise where.fail(f"not valid YAML{yaml_problem(exc)}") from None
    return parse_declared(data, source=path.name)


def parse_declared(data: object, *, source: str) -> Topology:
    """Validate an already-loaded YAML document and build its Topology; ``source`` names it.

    >>> doc = {"schema": "offload-topology/1",
    ...        "nodes": [{"id": 0, "cpus": "0-3", "capacity": "16GiB"}]}
    >>> parse_declared(doc, source="inline").nodes[0].total_bytes
    17179869184
    """
    where = _Where(source)
    top = _mapping(data, "the document", where)
    _check_keys(top, _TOP_KEYS, "the top level", where)
    if "schema" not in top:
        raise where.fail(f"missing key 'schema'; start the file with 'schema: {SCHEMA}'")
    if top["schema"] != SCHEMA:
        raise where.fail(
            f"schema = {top['schema']!r} is not supported; this version reads {SCHEMA!r}"
        )
    raw_nodes = top.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise where.fail(
            "nodes must be a non-empty list of nodes, e.g. '- {id: 0, capacity: 64GiB}'"
        )
    nodes = [_node(raw, f"nodes[{i}]", where) for i, raw in enumerate(raw_nodes)]
    homes = _check_nodes(nodes, raw_nodes, where)
    notes = [_string(n, f"notes[{i}]", where) for i, n in enumerate(_list(top, "notes", where))]
    if "distances" in top:
        distances = _distances(top["distances"], nodes, where)
    else:
        distances = _default_distances(nodes, homes)
        notes.append(
            f"distances not declared: assumed {LOCAL_DISTANCE} local, {REMOTE_DRAM_DISTANCE} "
            f"between DRAM nodes, {CXL_HOME_DISTANCE} from a CXL node to its home node, "
            f"{CXL_FAR_DISTANCE} to other CPU nodes, {CXL_TO_CXL_DISTANCE} between CXL nodes"
        )
    gpus = tuple(
        _gpu(raw, f"gpus[{i}]", nodes, where) for i, raw in enumerate(_list(top, "gpus", where))
    )
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise where.fail(f"gpus: indices {indices} repeat; give each GPU its own index")
    name = top.get("name", Path(source).stem)
    return Topology(
        nodes=tuple(nodes),
        distances=distances,
        gpus=gpus,
        source=f"declared:{source}",
        name=_string(name, "name", where),
        notes=tuple(notes),
    )


def _resolve(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        shipped = SHIPPED_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path}.yaml")
        if shipped.is_file():
            return shipped
    raise TopologyError(
        f"no topology file {str(path_or_name)!r}: it is not a file, nor a shipped name "
        f"({', '.join(shipped_topologies())}); pass a YAML path or one of those names"
    )


def _node(raw: object, path: str, where: _Where) -> NumaNode:
    spec = _mapping(raw, path, where)
    _check_keys(spec, _NODE_KEYS, path, where)
    for key in ("id", "capacity"):
        if key not in spec:
            raise where.fail(f"{path}: missing key {key!r}; every node needs id and capacity")
    node_id = _int(spec["id"], f"{path}.id", where)
    cpus = _cpus(spec.get("cpus", ()), f"{path}.cpus", where)
    total_bytes = _size(spec["capacity"], f"{path}.capacity", where)
    free_bytes = _size(spec.get("free", total_bytes), f"{path}.free", where)
    if free_bytes > total_bytes:
        raise where.fail(
            f"{path}.free = {spec['free']!r} is more than capacity {spec['capacity']!r}; "
            f"free is at most the capacity"
        )
    kind = spec.get("kind", "dram" if cpus else "cxl")
    if kind not in ("dram", "cxl"):
        raise where.fail(f"{path}.kind = {kind!r} is not a node kind; write 'dram' or 'cxl'")
    if kind == "cxl" and cpus:
        raise where.fail(
            f"{path}: kind 'cxl' with cpus {spec['cpus']!r}; a CXL node has no CPUs, so drop "
            f"cpus or write kind: dram"
        )
    movable = spec.get("movable_only", False)
    if not isinstance(movable, bool):
        raise where.fail(f"{path}.movable_only = {movable!r} is not true or false")
    tier = spec.get("memory_tier")
    return NumaNode(
        id=node_id,
        kind=kind,
        cpus=cpus,
        total_bytes=total_bytes,
        free_bytes=free_bytes,
        movable_only=movable,
        memory_tier=None if tier is None else _int(tier, f"{path}.memory_tier", where),
        cxl_evidence=("declared",) if kind == "cxl" else (),
        rates=_rates(spec.get("rates", {}), f"{path}.rates", where),
    )


def _check_nodes(nodes: list[NumaNode], raw_nodes: list, where: _Where) -> dict[int, int]:
    """Ids unique, CPUs not shared, and each CXL node's home CPU node; returns {cxl id: home id}."""
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}
    for i, node in enumerate(nodes):
        if node.id in seen:
            raise where.fail(
                f"nodes[{i}].id = {node.id} repeats nodes[{seen[node.id]}].id; give each node "
                f"its own id"
            )
        seen[node.id] = i
        for cpu in node.cpus:
            if cpu in owner:
                raise where.fail(
                    f"nodes[{i}].cpus: CPU {cpu} is already in nodes[{owner[cpu]}]; each CPU "
                    f"belongs to one node"
                )
            owner[cpu] = i
    cpu_nodes = [n.id for n in nodes if n.has_cpus]
    if not cpu_nodes:
        raise where.fail("nodes: no node has cpus; declare the CPU node(s), e.g. cpus: '0-31'")
    homes = {}
    for i, (node, raw) in enumerate(zip(nodes, raw_nodes, strict=True)):
        if "attached_to" not in raw:
            if node.kind == "cxl":
                homes[node.id] = cpu_nodes[0]
            continue
        home = _int(raw["attached_to"], f"nodes[{i}].attached_to", where)
        if node.kind != "cxl" or home not in cpu_nodes:
            raise where.fail(
                f"nodes[{i}].attached_to = {raw['attached_to']!r}: only a cxl node has a home, "
                f"and it must be a node with cpus ({cpu_nodes})"
            )
        homes[node.id] = home
    return homes


def _default_distances(nodes: list[NumaNode], homes: dict[int, int]) -> dict[int, dict[int, int]]:
    def distance(a: NumaNode, b: NumaNode) -> int:
        if a.id == b.id:
            return LOCAL_DISTANCE
        if a.kind == "cxl" and b.kind == "cxl":
            return CXL_TO_CXL_DISTANCE
        if a.kind == "dram" and b.kind == "dram":
            return REMOTE_DRAM_DISTANCE
        cxl, other = (a, b) if a.kind == "cxl" else (b, a)
        return CXL_HOME_DISTANCE if homes[cxl.id] == other.id else CXL_FAR_DISTANCE

    return {a.id: {b.id: distance(a, b) for b in nodes} for a in nodes}


def _distances(raw: object, nodes: list[NumaNode], where: _Where) -> dict[int, dict[int, int]]:
    ids = [n.id for n in nodes]
    shape = f"write {len(ids)} rows of {len(ids)} numbers, in the order of nodes (ids {ids})"
    if not isinstance(raw, list) or len(raw) != len(ids):
        raise where.fail(f"distances must be a matrix with one row per node; {shape}")
    matrix: dict[int, dict[int, int]] = {}
    for r, (row, a) in enumerate(zip(raw, ids, strict=True)):
        if not isinstance(row, list) or len(row) != len(ids):
            raise where.fail(f"distances[{r}] = {row!r} is not a row of {len(ids)}; {shape}")
        matrix[a] = {}
        for c, (value, b) in enumerate(zip(row, ids, strict=True)):
            d = _int(value, f"distances[{r}][{c}]", where)
            want_local = r == c
            if (want_local and d != LOCAL_DISTANCE) or (not want_local and d <= LOCAL_DISTANCE):
                raise where.fail(
                    f"distances[{r}][{c}] = {d}: the diagonal is {LOCAL_DISTANCE} and other "
                    f"entries are above {LOCAL_DISTANCE} (ACPI SLIT, e.g. 21 for the other socket)"
                )
            matrix[a][b] = d
    return matrix


def _gpu(raw: object, path: str, nodes: list[NumaNode], where: _Where) -> GpuInfo:
    spec = _mapping(raw, path, where)
    _check_keys(spec, _GPU_KEYS, path, where)
    for key in ("index", "numa_node", "hbm"):
        if key not in spec:
            raise where.fail(f"{path}: missing key {key!r}; every GPU needs index, numa_node, hbm")
    index = _int(spec["index"], f"{path}.index", where)
    node = _int(spec["numa_node"], f"{path}.numa_node", where)
    cpu_nodes = [n.id for n in nodes if n.has_cpus]
    if node not in cpu_nodes:
        raise where.fail(
            f"{path}.numa_node = {node} is not a node with cpus; a GPU hangs off a CPU node "
            f"({cpu_nodes})"
        )
    return GpuInfo(
        index=index,
        name=_string(spec.get("name", f"GPU {index}"), f"{path}.name", where),
        pci_bus_id=_string(spec.get("pci_bus_id", ""), f"{path}.pci_bus_id", where),
        numa_node=node,
        numa_node_known=True,
        total_bytes=_size(spec["hbm"], f"{path}.hbm", where),
        source="declared",
    )


def _rates(raw: object, path: str, where: _Where) -> NodeRates:
    spec = _mapping(raw, path, where)
    _check_keys(spec, _RATE_KEYS, path, where)
    values = {}
    for key, value in spec.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            unit = "nanoseconds" if key == "latency_ns" else "GiB/s"
            raise where.fail(f"{path}.{key} = {value!r} is not a positive number of {unit}")
        values[key] = float(value)
    return NodeRates(**values)


def _check_keys(spec: dict, allowed: tuple[str, ...], path: str, where: _Where) -> None:
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise where.fail(f"{path}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _mapping(raw: object, path: str, where: _Where) -> dict:
    if not isinstance(raw, dict):
        raise where.fail(f"{path} must be a mapping of key: value, not {type(raw).__name__}")
    return raw


def _list(top: dict, key: str, where: _Where) -> list:
    value = top.get(key, [])
    if not isinstance(value, list):
        raise where.fail(f"{key} must be a list ('- item' per line), not {type(value).__name__}")
    return value


def _int(value: object, path: str, where: _Where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise where.fail(f"{path} = {value!r} is not a whole number >= 0")
    return value


def _string(value: object, path: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.fail(f"{path} = {value!r} is not text; put it in quotes")
    return value


def _size(value: object, path: str, where: _Where) -> int:
    try:
        return parse_size(value, what=path)
    except ValueError as exc:
        raise where.fail(str(exc)) from None


def _cpus(value: object, path: str, where: _Where) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
            raise where.fail(f"{path} = {value!r}: write CPU numbers >= 0 or a list like '0-15'")
        return tuple(sorted(set(value)))
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    try:
        return parse_cpu_list(_string(value, path, where), what=path)
    except ValueError as exc:
        raise where.fail(str(exc)) from None
