"""The versioned run record (``offload-run/1``) that ``OffloadSession.save`` writes: config, plan,
topology, machine facts, transfer ceilings and one row per step, gathered by a RunRecorder that
subscribes to the session's steps; loaded back typed. No measuring.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from allocators.errors import OffloadError
from allocators.json_text import parse_json_file
from allocators.policies import parse_budgets
from allocators.tiered import DEFAULT_BUDGETS, TieredAllocator
from allocators.topology import Topology
from allocators.topology_json import topology_to_dict
from offload.config import OffloadConfig
from offload.planning.run_plan import RunPlan
from offload.tools.transfer_ceilings import TransferCeilings, transfer_ceilings

SCHEMA = "offload-run/1"
PHASES = ("forward", "backward", "optimizer", "wait")


class RunRecordError(OffloadError, ValueError):
    """A run record file is missing a key, has a wrong type, or is of another schema."""


@dataclass(frozen=True)
class MachineFacts:
    """Where a run ran: host name, torch and CUDA versions, GPU name (None without a GPU)."""

    hostname: str
    torch: str
    cuda: str | None
    gpu_name: str | None


@dataclass(frozen=True)
class PlanRecord:
    """The planner's choice: ``[[node, share], ...]`` per host tensor group and predicted seconds."""

    placements: dict[str, list[list[float]]]
    predicted_s: dict[str, float]
    batch: int
    seq: int
    profile: str | None


@dataclass(frozen=True)
class RunRecord:
    """One saved run; ``steps`` holds ``sess.report()``'s rows, units in column names.

    ``ceilings`` are the H2D/D2H rates the run's copies are measured against (the dashboard's:
    the profile's measured rates, else the topology's declared ones); None in records saved
    before ceilings were stored, which still load.

    >>> rec = RunRecord(SCHEMA, "2026-01-01T00:00:00Z", {}, None, {},
    ...                 MachineFacts("h", "2.13", None, None), [{"step": 0, "forward_ms": 1.5}])
    >>> run_from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    True
    """

    schema: str
    created_utc: str
    config: dict[str, Any]
    plan: PlanRecord | None
    topology: dict[str, Any]
    machine: MachineFacts
    steps: list[dict[str, float | int | None]]
    ceilings: TransferCeilings | None = None

    @property
    def has_dma(self) -> bool:
        """Whether the copies were GPU DMA: the session records peak HBM only on a CUDA device,
        so a CPU run (its "H2D"/"D2H" are host memcpy) has none in any step."""
        return any(row.get("peak_hbm_nbytes") is not None for row in self.steps)

    @property
    def where(self) -> str:
        """Where the numbers come from, for figure titles: ``"measured on vm (CPU only, no GPU)"``.

        >>> RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("vm", "2.13", None, None), []).where
        'measured on vm (CPU only, no GPU)'
        """
        device = self.machine.gpu_name or "CPU only, no GPU"
        return f"measured on {self.machine.hostname} ({device})"

    def steps_frame(self) -> pd.DataFrame:
        """The per-step rows as a DataFrame (``step``, ``forward_ms``, ``d2h_gb_per_s``, ...)."""
        return pd.DataFrame.from_records(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, the inverse of :func:`run_from_dict`."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the record as indented JSON and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def machine_facts() -> MachineFacts:
    """This machine's facts; ``cuda``/``gpu_name`` are None without a GPU.

    >>> machine_facts().torch == torch.__version__
    True
    """
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return MachineFacts(socket.gethostname(), torch.__version__, torch.version.cuda, gpu)


def record_run(
    config: OffloadConfig,
    plan: RunPlan | None,
    topology: Topology,
    steps: Sequence[Mapping[str, Any]],
    nodes: Iterable[int] | None = None,
) -> RunRecord:
    """Build the record of a session's run from its config, plan, topology and report rows.

    The ceilings are those the dashboard draws against, over ``nodes`` (the host nodes the run's
    allocator budgets; None: those ``config.budgets`` give bytes, as enable() budgets them).

    >>> from allocators.declared_topology import load_declared
    >>> rec = record_run(OffloadConfig(), None, load_declared("paper-1aic"), [{"step": 0}])
    >>> rec.schema, rec.config["policy"], rec.topology["name"]
    ('offload-run/1', 'cxl_aware', 'paper-1aic')
    >>> rec.ceilings.source
    'declared rates (declared:paper-1aic.yaml)'
    """
    plan_record = None
    if plan is not None:
        plan_record = PlanRecord(
            placements={
                group: [[node, share] for node, share in placement.shares]
                for group, placement in sorted(plan.placements.items())
            },
            predicted_s=dict(plan.predicted_s),
            batch=plan.batch,
            seq=plan.seq,
            profile=plan.profile,
        )
    return RunRecord(
        schema=SCHEMA,
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        config=dataclasses.asdict(config),
        plan=plan_record,
        topology=topology_to_dict(topology),
        machine=machine_facts(),
        steps=[dict(row) for row in steps],
        ceilings=run_ceilings(config, topology, nodes),
    )


class RunRecorder:
    """Keeps a session's step rows (a step subscriber) and writes them, with the run's config,
    plan, topology and machine, as an ``offload-run/1`` record; offload.enable() subscribes one
    and ``OffloadSession.save`` calls :meth:`save`. The ceilings are those of the nodes the
    run's allocator budgets.

    >>> from allocators.declared_topology import load_declared
    >>> recorder = RunRecorder(OffloadConfig(), None, TieredAllocator(load_declared("paper-1aic")))
    >>> recorder.on_step({"step": 0, "forward_ms": 1.5}); recorder.record().steps
    [{'step': 0, 'forward_ms': 1.5}]
    """

    def __init__(
        self, config: OffloadConfig, plan: RunPlan | None, allocator: TieredAllocator
    ) -> None:
        self.config = config
        self.plan = plan
        self.allocator = allocator
        self.steps: list[dict[str, Any]] = []

    def on_step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)

    def on_restore(self, rows: list[dict[str, Any]]) -> None:
        self.steps = list(rows)

    def close(self) -> None:
        """Nothing to finish: the rows stay, so a disabled session can still be saved."""

    def record(self) -> RunRecord:
        """The run so far as a record."""
        nodes = [n for n, nbytes in self.allocator.budgets.node_nbytes.items() if nbytes > 0]
        return record_run(self.config, self.plan, self.allocator.topology, self.steps, nodes)

    def save(self, path: str | Path) -> Path:
        """Write the run so far to ``path`` (JSON) and return it."""
        return self.record().save(path)


def run_ceilings(
    config: OffloadConfig, topology: Topology, nodes: Iterable[int] | None = None
) -> TransferCeilings:
    """The transfer ceilings of a run under ``config`` on ``topology`` over ``nodes`` (None: the
    nodes ``config.budgets``, or the default budgets, give bytes); see transfer_ceilings.

    A profile that can no longer be read at save time leaves the rates unknown and says why in
    the source, rather than losing the run's record.

    >>> from allocators.declared_topology import load_declared
    >>> c = run_ceilings(OffloadConfig(), load_declared("paper-1aic"))
    >>> c.h2d_gb_per_s > 0, c.d2h_gb_per_s > 0
    (True, True)
    """
    if nodes is None:
        budgets = parse_budgets(config.budgets or dict(DEFAULT_BUDGETS), topology.tiers)
        nodes = [node for node, nbytes in budgets.node_nbytes.items() if nbytes > 0]
    try:
        return transfer_ceilings(topology, config.profile, nodes)
    except (OSError, OffloadError) as exc:
        return TransferCeilings(None, None, f"profile {config.profile} unreadable at save: {exc}")


def _get(data: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    path = f"{where}.{key}" if where else key
    if not isinstance(data, dict):
        raise RunRecordError(f"run record key '{where}' must be an object")
    if key not in data:
        raise RunRecordError(
            f"run record is missing key '{path}'; write it with OffloadSession.save(path)"
        )
    value = data[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
        raise RunRecordError(f"run record key '{path}' = {value!r} must be {names}")
    return value


def _number(value: Any, path: str) -> float | int | None:
    # bool is an int in Python, but a byte count written as true is still wrong.
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        if isinstance(value, float) and not math.isfinite(value):
            raise RunRecordError(f"run record key '{path}' = {value!r} must be a finite number")
        return value
    raise RunRecordError(f"run record key '{path}' = {value!r} must be a number or null")


def run_from_dict(data: Any) -> RunRecord:
    """Validate decoded JSON and build the typed record; errors name the offending key.

    >>> run_from_dict({"schema": "offload-profile/1"})
    Traceback (most recent call last):
    ...
    offload.tools.run_record.RunRecordError: run record key 'schema' = 'offload-profile/1' is not offload-run/1; save the run with OffloadSession.save(path)
    """
    schema = _get(data, "schema", str, "")
    if schema != SCHEMA:
        raise RunRecordError(
            f"run record key 'schema' = {schema!r} is not {SCHEMA}; "
            "save the run with OffloadSession.save(path)"
        )
    m = _get(data, "machine", dict, "")
    machine = MachineFacts(
        hostname=_get(m, "hostname", str, "machine"),
        torch=_get(m, "torch", str, "machine"),
        cuda=_get(m, "cuda", (str, type(None)), "machine"),
        gpu_name=_get(m, "gpu_name", (str, type(None)), "machine"),
    )
    plan = None
    p = _get(data, "plan", (dict, type(None)), "")
    if p is not None:
        placements = _get(p, "placements", dict, "plan")
        for group, shares in placements.items():
            ok = isinstance(shares, list) and all(
                isinstance(s, list) and len(s) == 2 for s in shares
            )
            if not ok:
                raise RunRecordError(
                    f"run record key 'plan.placements.{group}' = {shares!r} must be "
                    "[[node, share], ...]"
                )
        predicted = _get(p, "predicted_s", dict, "plan")
        plan = PlanRecord(
            placements=placements,
            predicted_s={k: _number(v, f"plan.predicted_s.{k}") for k, v in predicted.items()},
            batch=_get(p, "batch", int, "plan"),
            seq=_get(p, "seq", int, "plan"),
            profile=_get(p, "profile", (str, type(None)), "plan"),
        )
    ceilings = None
    c = data.get("ceilings")
    if c is not None:
        # Absent (or null) in records saved before ceilings were stored: they stay readable.
        ceilings = TransferCeilings(
            h2d_gb_per_s=_number(
                _get(c, "h2d_gb_per_s", (int, float, type(None)), "ceilings"),
                "ceilings.h2d_gb_per_s",
            ),
            d2h_gb_per_s=_number(
                _get(c, "d2h_gb_per_s", (int, float, type(None)), "ceilings"),
                "ceilings.d2h_gb_per_s",
            ),
            source=_get(c, "source", (str, type(None)), "ceilings"),
        )
    steps = []
    for i, row in enumerate(_get(data, "steps", list, "")):
        if not isinstance(row, dict):
            raise RunRecordError(f"run record key 'steps.{i}' must be an object of columns")
        steps.append({k: _number(v, f"steps.{i}.{k}") for k, v in row.items()})
    return RunRecord(
        schema=schema,
        created_utc=_get(data, "created_utc", str, ""),
        config=_get(data, "config", dict, ""),
        plan=plan,
        topology=_get(data, "topology", dict, ""),
        machine=machine,
        steps=steps,
        ceilings=ceilings,
    )


def read_json(path: str | Path) -> Any:
    """Decoded JSON of ``path``; a missing file or bad JSON is an error that says so.

    >>> read_json("/no/such/run.json")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/run.json not found; save a run with OffloadSession.save(path)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; save a run with OffloadSession.save(path)")
    try:
        return parse_json_file(path)
    except ValueError as exc:
        raise RunRecordError(f"{path} is not JSON ({exc}); save the run again") from None


def load_run(path: str | Path) -> RunRecord:
    """Read and validate a run record written by ``OffloadSession.save``.

    >>> load_run("/no/such/run.json")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /no/such/run.json not found; save a run with OffloadSession.save(path)
    """
    try:
        return run_from_dict(read_json(path))
    except RunRecordError as exc:
        raise RunRecordError(f"{path}: {exc}") from None


def run_summary(record: RunRecord) -> dict[str, float | int | str | None]:
    """One comparison row: steps, median phase ms, GB/s each way against the recorded ceilings,
    where the ceilings came from, hidden fraction, peaks.

    ``copy_kind`` is ``dma`` on a GPU, ``host_memcpy`` on CPU (where no ceiling fraction is
    given); ``<dir>_of_ceiling_fraction`` is the median achieved rate over the ceiling.
    ``peak_hbm_nbytes`` is None on CPU; ``host_<tier>_nbytes`` are the most each tier held.

    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("h", "2", None, None),
    ...     [{"step": 0, "forward_ms": 1.0, "host_dram_nbytes": 8},
    ...      {"step": 1, "forward_ms": 3.0, "host_dram_nbytes": 4}])
    >>> s = run_summary(rec); s["steps"], s["forward_ms_median"], s["host_dram_nbytes_max"]
    (2, 2.0, 8)
    """
    frame = record.steps_frame()

    def median(column: str) -> float | None:
        values = frame[column].dropna() if column in frame else ()
        return float(values.median()) if len(values) else None

    def peak(column: str) -> int | None:
        values = frame[column].dropna() if column in frame else ()
        return int(values.max()) if len(values) else None

    row: dict[str, float | int | str | None] = {"hostname": record.machine.hostname}
    row["steps"] = len(frame)
    for phase in PHASES:
        row[f"{phase}_ms_median"] = median(f"{phase}_ms")
    row["copy_kind"] = "dma" if record.has_dma else "host_memcpy"
    ceilings = record.ceilings
    for direction in ("h2d", "d2h"):
        row[f"{direction}_gb_per_s_median"] = median(f"{direction}_gb_per_s")
        ceiling = getattr(ceilings, f"{direction}_gb_per_s") if ceilings else None
        row[f"{direction}_ceiling_gb_per_s"] = ceiling
        # A host memcpy's rate against a PCIe ceiling would compare unlike things.
        achieved = row[f"{direction}_gb_per_s_median"]
        fraction = achieved / ceiling if record.has_dma and ceiling and achieved else None
        row[f"{direction}_of_ceiling_fraction"] = fraction
    row["ceiling_source"] = ceiling_source_text(ceilings)
    row["hidden_transfer_fraction_median"] = median("hidden_transfer_fraction")
    row["peak_hbm_nbytes_max"] = peak("peak_hbm_nbytes")
    tiers = sorted(c for c in frame.columns if c.startswith("host_") and c.endswith("_nbytes"))
    for column in tiers:
        row[f"{column}_max"] = peak(column)
    return row


def ceiling_source_text(ceilings: TransferCeilings | None) -> str:
    """Where a run's ceilings came from, in words, also when there are none.

    >>> ceiling_source_text(None)
    'not recorded (saved before ceilings were stored)'
    >>> ceiling_source_text(TransferCeilings(None, None, None))
    'none (no measured profile, no declared rates)'
    """
    if ceilings is None:
        return "not recorded (saved before ceilings were stored)"
    return ceilings.source or "none (no measured profile, no declared rates)"
