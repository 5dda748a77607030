"""Rich tables of result rows and of a machine profile, for the end of an ``offload-profile`` run.

Only rendering lives here; it must not measure, read files or decide which rates count.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from allocators.table_width import wrap_not_cut
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
    return wrap_not_cut(table)


def profile_table(profile: MachineProfile) -> Table:
    """Rates of a profile, one row per rate and one column per node; ``-`` where not measured.

    Rates are rows because a machine has a handful of nodes but nine rates: columns named after
    the rates were cut to "read_…" on an 80-column terminal. The caption says what was skipped
    and which machine it was, so a CPU-only profile's empty DMA rows read as skipped, not as zero.

    >>> from profilers.machine_info import MachineInfo, Versions
    >>> from profilers.machine_profile import NodeProfile
    >>> p = MachineProfile("t", MachineInfo("h", "c", 1, 1, 1), Versions("3", "2", None, None, "0"),
    ...                    {}, {0: NodeProfile(latency_ns=100.0)}, skipped=("bandwidth: no GPU",))
    >>> table = profile_table(p)
    >>> table.row_count, [c.header for c in table.columns]
    (9, ['rate', 'node 0'])
    """
    machine = profile.machine
    table = Table(
        title=f"profile of {machine.hostname} ({profile.schema}, {profile.created_utc})",
        title_justify="left",
        caption="; ".join(
            [
                f"{machine.cpu_model}, {machine.cores} cores, "
                f"{format_bytes(machine.memory_bytes)}, kernel {profile.kernel}"
                + (" (degraded)" if profile.degraded else ""),
                *(f"skipped {s}" for s in profile.skipped),
            ]
        ),
        caption_justify="left",
        # Title and caption wrap to the table's width; one node's two columns alone are narrow.
        min_width=76,
    )
    table.add_column("rate")
    nodes = sorted(profile.nodes.items())
    for node, _ in nodes:
        table.add_column(f"node {node}", justify="right")
    for key in RATE_KEYS:
        values = [getattr(rates, key) for _, rates in nodes]
        table.add_row(key, *("-" if v is None else f"{v:.4g}" for v in values))
    return wrap_not_cut(table)
