"""Rich tables of result rows and of a machine profile, for the end of an ``offload-profile`` run.

Only rendering lives here; it must not measure, read files or decide which rates count.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from allocators.units import format_bytes
from profilers.machine_profile import RATE_KEYS, MachineProfile
from profilers.result_row import ResultRow


def _flags(row: ResultRow) -> str:
    flags = [
        name
        for name, on in (
            ("noisy", row.noisy),
            ("degraded", row.degraded),
            ("emulated", row.emulated),
        )
        if on
    ]
    return ",".join(flags)


def rows_table(rows: Sequence[ResultRow], title: str) -> Table:
    """One line per row: case, placement, size, threads/streams, median [p5..p95] unit, flags.

    >>> from profilers.trial_stats import TrialStats
    >>> row = ResultRow.from_stats("latency", "chase", "node0", 16384, "ns", TrialStats(2, 1, 3, 5, True))
    >>> rows_table([row], "latency").row_count
    1
    """
    headers = (
        "case",
        "placement",
        "size",
        "pages",
        "threads",
        "streams",
        "memory",
        "median",
        "p5..p95",
        "flags",
    )
    lines = [
        (
            r.case,
            r.placement,
            format_bytes(r.nbytes) if not r.elements else f"{r.elements / 1e6:.3g}M elem",
            r.page_size,
            str(r.threads),
            str(r.streams) if r.streams else "",
            r.memory,
            f"{r.median:.4g} {r.unit}",
            f"{r.p5:.4g}..{r.p95:.4g}",
            _flags(r),
        )
        for r in rows
    ]
    # Columns empty in every row (no streams on a CPU run, no flags) only cost width.
    keep = [i for i in range(len(headers)) if any(line[i] for line in lines)]
    table = Table(title=title, title_justify="left")
    for i in keep:
        table.add_column(
            headers[i], justify="right" if headers[i] in ("size", "median", "p5..p95") else "left"
        )
    for line in lines:
        table.add_row(*(line[i] for i in keep))
    return table


def profile_table(profile: MachineProfile) -> Table:
    """Per-node rates of a profile; ``-`` where a rate was not measured.

    >>> from profilers.machine_info import MachineInfo, Versions
    >>> from profilers.machine_profile import NodeProfile
    >>> p = MachineProfile("t", MachineInfo("h", "c", 1, 1, 1), Versions("3", "2", None, None, "0"),
    ...                    {}, {0: NodeProfile(latency_ns=100.0)})
    >>> profile_table(p).row_count
    1
    """
    table = Table(
        title=f"profile of {profile.machine.hostname} ({profile.schema})", title_justify="left"
    )
    table.add_column("node")
    for key in RATE_KEYS:
        table.add_column(key, justify="right")
    for node, rates in sorted(profile.nodes.items()):
        values = [getattr(rates, k) for k in RATE_KEYS]
        table.add_row(str(node), *("-" if v is None else f"{v:.4g}" for v in values))
    return table
