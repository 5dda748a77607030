"""The versioned machine profile (``offload-profile/1``): typed, written as JSON, loaded back with
errors that name the bad key. Only the file format lives here; rates are computed elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allocators.errors import OffloadError
from allocators.json_text import parse_json_file
from allocators.topology import NodeRates
from profilers.machine_info import MachineInfo, Versions

SCHEMA = "offload-profile/1"


class ProfileError(OffloadError, ValueError):
    """A profile file is missing a key, has a wrong type, or is of another schema."""


@dataclass(frozen=True)
class NodeProfile:
    """Measured rates of one NUMA node; None where the run did not measure it.

    ``latency_ns``: idle load latency at the largest chased buffer (lowest over page sizes).
    ``read/write_gib_per_s``: best CPU stream rate over thread counts. ``h2d/d2h_gib_per_s``:
    pinned copy with one stream at the largest size. ``prefault_s_per_gib``: allocate and touch;
    ``pin_s_per_gib``: allocate, touch and cudaHostRegister. ``adamw_elements_per_s``: CPU AdamW
    with all state on this node, at the largest size measured. ``dma_share_during_step``: the
    pinned H2D+D2H rate while AdamW steps on the node's cores, as a share of its rate alone
    (``offload-profile contention`` with a GPU; emulated DMA does not count): what
    ``contention="auto"`` reads.
    """

    latency_ns: float | None = None
    read_gib_per_s: float | None = None
    write_gib_per_s: float | None = None
    h2d_gib_per_s: float | None = None
    d2h_gib_per_s: float | None = None
    prefault_s_per_gib: float | None = None
    pin_s_per_gib: float | None = None
    adamw_elements_per_s: float | None = None
    dma_share_during_step: float | None = None


RATE_KEYS = tuple(f.name for f in dataclasses.fields(NodeProfile))


@dataclass(frozen=True)
class MachineProfile:
    """What ``offload-profile`` measured on one machine; the planner reads this.

    >>> from profilers.machine_info import MachineInfo, Versions
    >>> p = MachineProfile(
    ...     created_utc="2026-01-01T00:00:00Z",
    ...     machine=MachineInfo("h", "cpu", 2, 2, 1 << 34),
    ...     versions=Versions("3.11", "2.13", None, None, "0.1.0"),
    ...     topology={}, nodes={0: NodeProfile(latency_ns=110.0, read_gib_per_s=12.0)})
    >>> p.to_node_rates()[0].latency_ns
    110.0
    """

    created_utc: str
    machine: MachineInfo
    versions: Versions
    topology: dict[str, Any]
    nodes: dict[int, NodeProfile]
    kernel: str = "c"
    degraded: bool = False
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    schema: str = SCHEMA

    def to_node_rates(self) -> dict[int, NodeRates]:
        """Node id -> allocators.topology.NodeRates, the form the planner takes."""
        return {
            node: NodeRates(
                latency_ns=p.latency_ns,
                read_gib_per_s=p.read_gib_per_s,
                write_gib_per_s=p.write_gib_per_s,
                h2d_gib_per_s=p.h2d_gib_per_s,
                d2h_gib_per_s=p.d2h_gib_per_s,
            )
            for node, p in sorted(self.nodes.items())
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (node ids become string keys)."""
        return {
            "schema": self.schema,
            "created_utc": self.created_utc,
            "machine": dataclasses.asdict(self.machine),
            "versions": dataclasses.asdict(self.versions),
            "topology": self.topology,
            "nodes": {str(n): dataclasses.asdict(p) for n, p in sorted(self.nodes.items())},
            "kernel": self.kernel,
            "degraded": self.degraded,
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }

    def save(self, path: Path) -> Path:
        """Write the profile as indented JSON and return the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _get(
    data: Any, key: str, kinds: type | tuple[type, ...], where: str, *, optional: bool = False
) -> Any:
    if not isinstance(data, dict):
        raise ProfileError(f"profile key '{where}' must be an object, got {type(data).__name__}")
    path = f"{where}.{key}" if where else key
    if key not in data:
        if optional:
            return None
        raise ProfileError(f"profile is missing key '{path}'; rerun offload-profile to rewrite it")
    value = data[key]
    if optional and value is None:
        return None
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int in Python; a count or rate written as true/false is still wrong.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(k.__name__ for k in allowed)
        raise ProfileError(f"profile key '{path}' = {value!r} must be {names}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"profile key '{path}' = {value!r} must be a finite number")
    return value


def profile_from_dict(data: Any) -> MachineProfile:
    """Validate a decoded profile and build the typed form; errors name the offending key.

    >>> profile_from_dict({"schema": "offload-profile/0"})
    Traceback (most recent call last):
    ...
    profilers.machine_profile.ProfileError: profile key 'schema' = 'offload-profile/0' is not offload-profile/1; rerun offload-profile with this version
    """
    schema = _get(data, "schema", str, "")
    if schema != SCHEMA:
        raise ProfileError(
            f"profile key 'schema' = {schema!r} is not {SCHEMA}; rerun offload-profile with this version"
        )
    m = _get(data, "machine", dict, "")
    machine = MachineInfo(
        hostname=_get(m, "hostname", str, "machine"),
        cpu_model=_get(m, "cpu_model", str, "machine"),
        cores=_get(m, "cores", int, "machine"),
        logical_cpus=_get(m, "logical_cpus", int, "machine"),
        memory_bytes=_get(m, "memory_bytes", int, "machine"),
    )
    v = _get(data, "versions", dict, "")
    versions = Versions(
        python=_get(v, "python", str, "versions"),
        torch=_get(v, "torch", str, "versions"),
        cuda=_get(v, "cuda", str, "versions", optional=True),
        driver=_get(v, "driver", str, "versions", optional=True),
        offload_profile=_get(v, "offload_profile", str, "versions"),
    )
    nodes: dict[int, NodeProfile] = {}
    for key, rates in _get(data, "nodes", dict, "").items():
        if not key.isdigit():
            raise ProfileError(f"profile key 'nodes.{key}' is not a NUMA node id; write e.g. \"0\"")
        where = f"nodes.{key}"
        if not isinstance(rates, dict):
            raise ProfileError(f"profile key '{where}' must be an object of rates, got {rates!r}")
        unknown = sorted(set(rates) - set(RATE_KEYS))
        if unknown:
            raise ProfileError(
                f"profile key '{where}.{unknown[0]}' is unknown; rates are {list(RATE_KEYS)}"
            )
        values = {k: _get(rates, k, (int, float), where, optional=True) for k in RATE_KEYS}
        negative = [k for k, x in values.items() if x is not None and x < 0]
        if negative:
            raise ProfileError(f"profile key '{where}.{negative[0]}' is negative; rates are >= 0")
        nodes[int(key)] = NodeProfile(
            **{k: None if x is None else float(x) for k, x in values.items()}
        )
    return MachineProfile(
        schema=schema,
        created_utc=_get(data, "created_utc", str, ""),
        machine=machine,
        versions=versions,
        topology=_get(data, "topology", dict, ""),
        nodes=nodes,
        kernel=_get(data, "kernel", str, ""),
        degraded=_get(data, "degraded", bool, ""),
        skipped=tuple(_get(data, "skipped", list, "")),
        notes=tuple(_get(data, "notes", list, "")),
    )


def load_profile(path: str | Path) -> MachineProfile:
    """Read and validate a profile JSON written by ``offload-profile``.

    >>> load_profile("/no/such/profile.json")
    Traceback (most recent call last):
    ...
    FileNotFoundError: profile /no/such/profile.json not found; run `offload-profile all --out DIR` to write one
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"profile {path} not found; run `offload-profile all --out DIR` to write one"
        )
    try:
        data = parse_json_file(path)
    except ValueError as exc:
        raise ProfileError(f"profile {path} is not JSON ({exc}); rerun offload-profile") from None
    return profile_from_dict(data)


def merge_profiles(old: MachineProfile, new: MachineProfile) -> MachineProfile:
    """``new`` with rates it did not measure taken from ``old`` (a subcommand adds to a profile).

    >>> from profilers.machine_info import MachineInfo, Versions
    >>> base = MachineProfile("t", MachineInfo("h", "c", 1, 1, 1), Versions("3", "2", None, None, "0"), {}, {})
    >>> a = dataclasses.replace(base, nodes={0: NodeProfile(latency_ns=100.0)})
    >>> b = dataclasses.replace(base, nodes={0: NodeProfile(read_gib_per_s=10.0)})
    >>> merged = merge_profiles(a, b).nodes[0]
    >>> (merged.latency_ns, merged.read_gib_per_s)
    (100.0, 10.0)
    """
    nodes = dict(old.nodes)
    for node, rates in new.nodes.items():
        before = nodes.get(node, NodeProfile())
        nodes[node] = NodeProfile(
            **{
                k: getattr(rates, k) if getattr(rates, k) is not None else getattr(before, k)
                for k in RATE_KEYS
            }
        )
    skipped = tuple(dict.fromkeys((*old.skipped, *new.skipped)))
    notes = tuple(dict.fromkeys((*old.notes, *new.notes)))
    return dataclasses.replace(
        new, nodes=nodes, degraded=old.degraded or new.degraded, skipped=skipped, notes=notes
    )
