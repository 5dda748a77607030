"""One measured number with its conditions and statistics, and the table (pandas, CSV) of many.

Only the row type and its table I/O live here; nothing is measured or summarised in this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from allocators.placement import Placement
from profilers.trial_stats import TrialStats


@dataclass(frozen=True)
class ResultRow:
    """One measurement: what ran (``benchmark``, ``case``), where (``placement``), how big, and
    the median/p5/p95 of its trials in ``unit`` (``ns``, ``GiB/s``, ``ms``, ``s/GiB``).

    ``threads`` counts CPU threads, ``streams`` CUDA streams (0 when no GPU took part).
    ``kernel`` names what did the work (``c``, ``numpy``, ``torch``, ``optim_cpu``, ...);
    ``degraded`` marks the numpy fallback, ``emulated`` a CPU thread standing in for DMA.
    ``thp_fraction`` is the share of the buffer backed by transparent huge pages (None: unknown or not asked).

    >>> row = ResultRow.from_stats("latency", "chase", "node0", 16384, "ns",
    ...                            TrialStats(2.0, 1.9, 2.2, 5, False), kernel="c")
    >>> (row.median, row.noisy)
    (2.0, False)
    """

    benchmark: str
    case: str
    placement: str
    nbytes: int
    unit: str
    median: float
    p5: float
    p95: float
    trials: int
    noisy: bool
    threads: int = 1
    streams: int = 0
    page_size: str = ""
    memory: str = ""
    elements: int = 0
    kernel: str = ""
    degraded: bool = False
    emulated: bool = False
    thp_fraction: float | None = None
    note: str = ""

    @classmethod
    def from_stats(
        cls,
        benchmark: str,
        case: str,
        placement: str,
        nbytes: int,
        unit: str,
        stats: TrialStats,
        **extra,
    ) -> ResultRow:
        """Build a row from a TrialStats plus any of the optional fields."""
        return cls(
            benchmark=benchmark,
            case=case,
            placement=placement,
            nbytes=nbytes,
            unit=unit,
            median=stats.median,
            p5=stats.p5,
            p95=stats.p95,
            trials=stats.trials,
            noisy=stats.noisy,
            **extra,
        )


COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow))


def placement_label(placement: Placement) -> str:
    """``node0`` for one node, ``node0:1+node2:2`` (smallest whole ratio when exact) for a mix.

    >>> from allocators.placement import as_placement
    >>> placement_label(as_placement(0))
    'node0'
    >>> placement_label(as_placement([(0, 1), (2, 2)]))
    'node0:1+node2:2'
    """
    if len(placement.shares) == 1:
        return f"node{placement.nodes[0]}"
    smallest = min(f for _, f in placement.shares)
    ratios = [f / smallest for _, f in placement.shares]
    if all(abs(r - round(r)) < 1e-6 for r in ratios):
        return "+".join(f"node{n}:{round(r)}" for n, r in zip(placement.nodes, ratios, strict=True))
    return "+".join(f"node{n}:{f:.3g}" for n, f in placement.shares)


def rows_to_frame(rows: Iterable[ResultRow]) -> pd.DataFrame:
    """A DataFrame with one column per ResultRow field, in field order.

    >>> rows_to_frame([]).columns[:3].tolist()
    ['benchmark', 'case', 'placement']
    """
    return pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=list(COLUMNS))


def write_rows_csv(rows: Iterable[ResultRow], path: Path) -> Path:
    """Write rows as CSV (creating the folder) and return the path.

    >>> write_rows_csv([], Path("/tmp/rows.csv")).name
    'rows.csv'
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rows_to_frame(rows).to_csv(path, index=False)
    return path


def read_rows_csv(path: Path) -> list[ResultRow]:
    """Read a CSV written by :func:`write_rows_csv` back into rows.

    >>> import tempfile
    >>> row = ResultRow("memory", "read", "node0", 1 << 20, "GiB/s", 10.0, 9.0, 11.0, 5, False)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     read_rows_csv(write_rows_csv([row], Path(d) / "r.csv")) == [row]
    True
    """
    frame = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; it was not written by offload-profile")
    types = {f.name: f.type for f in dataclasses.fields(ResultRow)}
    rows = []
    for record in frame[list(COLUMNS)].to_dict(orient="records"):
        values = {}
        for name, value in record.items():
            kind = types[name]
            if kind == "float | None":
                values[name] = None if value == "" else float(value)
            elif kind == "bool":
                values[name] = str(value).lower() == "true"
            elif kind == "int":
                values[name] = int(value)
            elif kind == "float":
                values[name] = float(value)
            else:
                values[name] = str(value)
        rows.append(ResultRow(**values))
    return rows
