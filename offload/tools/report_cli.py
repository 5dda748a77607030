"""`offload report`: compare saved runs (``offload-run/1``) in a rich table, CSV and PNGs, and show
profiles (``offload-profile/1``) as their per-node rates table. Reading and printing only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from allocators.errors import OffloadError
from allocators.table_width import wrap_not_cut
from allocators.units import format_bytes
from offload.tools.run_record import SCHEMA, RunRecord, load_run, read_json, run_summary


def register(subparsers) -> None:
    """Add the ``report`` subcommand.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> args = parser.parse_args(["report", "a.json", "b.json", "--csv", "out.csv"])
    >>> args.files, args.csv, args.plot
    (['a.json', 'b.json'], 'out.csv', None)
    """
    parser = subparsers.add_parser(
        "report",
        help="compare saved runs (sess.save) and show offload-profile results",
        description="Compare run records written by OffloadSession.save: steps, median phase "
        "times, GB/s each way against the recorded ceilings and where those came from, hidden "
        "transfer fraction, peak HBM and host bytes per tier. "
        "Profile JSONs from offload-profile are shown as their per-node rates.",
    )
    parser.add_argument("files", nargs="+", help="run.json or profile.json files")
    parser.add_argument("--csv", help="write the comparison of runs to this CSV")
    parser.add_argument("--plot", help="write PNG figures of the runs into this folder")
    parser.set_defaults(func=_run)


def comparison_frame(runs: Mapping[str, RunRecord]) -> pd.DataFrame:
    """One row per run (``run`` then :func:`offload.tools.run_record.run_summary`'s unit-named columns).

    >>> from offload.tools.run_record import MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("h", "2", None, None),
    ...                 [{"step": 0, "forward_ms": 1.0}])
    >>> comparison_frame({"a": rec})[["run", "steps", "forward_ms_median"]].values.tolist()
    [['a', 1, 1.0]]
    """
    return pd.DataFrame.from_records({"run": name, **run_summary(r)} for name, r in runs.items())


def _cell(column: str, value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if column.endswith("_nbytes_max"):
        return format_bytes(value)
    if "_fraction" in column:
        return f"{value:.0%}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def comparison_table(frame: pd.DataFrame) -> Table:
    """Metrics down, runs across, so many runs and tiers still fit a terminal.

    >>> comparison_table(pd.DataFrame({"run": ["a"], "steps": [3]})).row_count
    1
    """
    table = Table(title="runs compared (medians over steps)", title_justify="left")
    table.add_column("metric")
    for name in frame["run"]:
        table.add_column(str(name), justify="right")
    for column in frame.columns:
        if column == "run":
            continue
        table.add_row(column, *(_cell(column, v) for v in frame[column].tolist()))
    return wrap_not_cut(table)


def _run_name(path: Path, taken: Mapping[str, RunRecord]) -> str:
    # Two runs saved as run.json in different folders still need different column names.
    return path.stem if path.stem not in taken else str(path)


def _run(args: argparse.Namespace) -> int:
    # Imported here: profilers sits beside offload, and only profile files need it.
    from profilers.machine_profile import SCHEMA as PROFILE_SCHEMA
    from profilers.machine_profile import profile_from_dict
    from profilers.report_tables import profile_table

    _check_outputs(args)
    console = Console()
    runs: dict[str, RunRecord] = {}
    for name in args.files:
        path = Path(name)
        data = read_json(path)
        if isinstance(data, dict) and data.get("schema") == PROFILE_SCHEMA:
            try:
                console.print(profile_table(profile_from_dict(data)))
            except OffloadError as exc:
                raise OffloadError(f"{path}: {exc}") from None
            continue
        runs[_run_name(path, runs)] = load_run(path)
    if (args.csv or args.plot) and not runs:
        raise OffloadError(
            f"--csv and --plot compare runs, and none of {args.files} is an {SCHEMA} record; "
            "give a file written by OffloadSession.save(path)"
        )
    if not runs:
        return 0
    frame = comparison_frame(runs)
    console.print(comparison_table(frame))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.csv, index=False)
        console.print(f"wrote {args.csv}", markup=False, highlight=False)
    if args.plot:
        for png in write_plots(runs, args.plot):
            console.print(f"wrote {png}", markup=False, highlight=False)
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before reading any run (not after)."""
    if args.csv and Path(args.csv).is_dir():
        raise OffloadError(
            f"--csv {args.csv} is a folder; give a file name such as {Path(args.csv) / 'runs.csv'}"
        )
    if args.plot:
        plot = Path(args.plot)
        above = next((p for p in (plot, *plot.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise OffloadError(
                f"--plot {args.plot}: {above} is a file, not a folder; give a folder for the "
                "figures, e.g. --plot report-figures"
            )


def write_plots(runs: Mapping[str, RunRecord], out_dir: str | Path) -> list[Path]:
    """The comparison figures into ``out_dir`` (created): ``report_step_breakdown.png``,
    ``report_bytes_per_tier.png`` and ``report_bandwidth.png``.

    >>> write_plots({"a": load_run("run.json")}, "docs")  # doctest: +SKIP
    """
    # Imported here: matplotlib is needed only when figures are asked for.
    from plots.run_bandwidth import plot_bandwidth
    from plots.run_steps import plot_step_breakdown, plot_tier_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        plot_step_breakdown(runs, out / "report_step_breakdown.png"),
        plot_tier_bytes(runs, out / "report_bytes_per_tier.png"),
        plot_bandwidth(runs, out / "report_bandwidth.png"),
    ]
