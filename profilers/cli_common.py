"""What every ``offload-profile`` measurement subcommand shares: options, node selection, the
progress bar, and writing CSV, the profile JSON, tables and plots. Measures nothing itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from allocators.cpu_lists import parse_cpu_list
from allocators.errors import OffloadError
from allocators.host_buffer import check_fits_machine
from allocators.sysfs_topology import discover
from allocators.topology import Topology
from allocators.units import parse_size
from profilers.machine_profile import load_profile, merge_profiles
from profilers.profile_rates import build_profile
from profilers.report_tables import profile_table, rows_table
from profilers.result_row import ResultRow, write_rows_csv
from profilers.trial_stats import MIN_TRIALS

PROFILE_NAME = "profile.json"
# Figures that exist per measurement; plots/ modules read the CSV, never our objects.
PLOT_MODULES = {
    "latency": "plots.profile_latency",
    "memory": "plots.profile_memory",
    "bandwidth": "plots.profile_bandwidth",
    "optimizer": "plots.profile_optimizer",
}


class OptionError(OffloadError, ValueError):
    """A command-line option names something this machine lacks, or is out of range."""


@dataclass
class Outcome:
    """What one measurement produced: its rows, and lines saying what was skipped and why."""

    name: str
    rows: list[ResultRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_out_dir() -> Path:
    """``./offload-profile-<host>``.

    >>> default_out_dir().name.startswith("offload-profile-")
    True
    """
    return Path(f"offload-profile-{socket.gethostname()}")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--quick``, ``--trials``, ``--nodes``, ``--plot``, ``--note`` and ``--cpu-node``.

    >>> parser = argparse.ArgumentParser()
    >>> add_common_options(parser)
    >>> parser.parse_args(["--quick"]).trials
    5
    """
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for CSV, JSON and PNG (default ./offload-profile-<host>/)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter runs")
    parser.add_argument(
        "--trials", type=int, default=MIN_TRIALS, help=f"timed trials per point (>= {MIN_TRIALS})"
    )
    parser.add_argument(
        "--nodes", default=None, help="NUMA nodes to measure, e.g. 0,2-3 (default: all with memory)"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNG figures through plots/")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line to keep in the profile's notes (e.g. 'machine shared with other jobs'); repeatable",
    )
    parser.add_argument(
        "--cpu-node",
        type=int,
        default=None,
        help="node whose cores run CPU threads (default: the GPU's node)",
    )


def machine_topology() -> Topology:
    """This machine's topology from /sys (NVML asked for GPUs when present).

    >>> 0 in machine_topology().node_ids
    True
    """
    return discover()


def selected_nodes(args: argparse.Namespace, topology: Topology) -> tuple[int, ...]:
    """The nodes named by ``--nodes`` (checked against the machine), else all memory nodes.

    >>> selected_nodes(argparse.Namespace(nodes="0"), machine_topology())
    (0,)
    """
    if args.nodes is None:
        return topology.node_ids
    try:
        nodes = parse_cpu_list(args.nodes, what="--nodes")
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    for node in nodes:
        topology.node(node)
    return nodes


def cpu_node_cpus(topology: Topology, cpu_node: int | None) -> tuple[int, tuple[int, ...]]:
    """(node, its CPUs) for ``cpu_node``, or the GPU's / first CPU node when None.

    >>> cpu_node_cpus(machine_topology(), 0)[0]
    0
    """
    node = topology.anchor_node() if cpu_node is None else cpu_node
    cpus = topology.node(node).cpus
    if not cpus:
        with_cpus = [n.id for n in topology.nodes if n.has_cpus]
        raise OptionError(
            f"node {node} has no CPUs to run threads on; pick one of {with_cpus} (--cpu-node)"
        )
    return node, cpus


def gpu_skip_reason() -> str | None:
    """Why GPU measurements cannot run here, or None when a CUDA GPU is usable.

    >>> reason = gpu_skip_reason()
    >>> reason is None or "GPU" in reason
    True
    """
    import torch

    if torch.version.cuda is None:
        return f"no CUDA GPU: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False (no device visible or no driver)"
    return None


def collect_rows(
    console: Console, description: str, total: int, rows: Iterable[ResultRow]
) -> list[ResultRow]:
    """Drain ``rows`` under a rich progress bar of ``total`` steps.

    >>> collect_rows(Console(quiet=True), "none", 0, iter([]))
    []
    """
    collected = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for row in rows:
            collected.append(row)
            progress.update(
                task, advance=1, description=f"{description}: {row.case} {row.placement}"
            )
    return collected


def load_note() -> str:
    """The machine's load when the profile was written: busy machines give slower, noisier rates.

    >>> load_note().startswith("load average")
    True
    """
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs at the end of the run"


def write_outcomes(
    args: argparse.Namespace, outcomes: Sequence[Outcome], topology: Topology, console: Console
) -> Path:
    """Write one CSV per outcome, merge the rates into ``profile.json``, print tables and
    skip lines, and draw figures with ``--plot``; return the output folder.

    >>> write_outcomes(args, [Outcome("latency", rows)], machine_topology(), Console())  # doctest: +SKIP
    PosixPath('offload-profile-host')
    """
    out = args.out or default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    all_rows: list[ResultRow] = []
    for outcome in outcomes:
        for line in outcome.skipped:
            console.print(f"[yellow]skipped[/] {outcome.name}: {escape(line)}", highlight=False)
        if not outcome.rows:
            continue
        all_rows.extend(outcome.rows)
        csv_path = write_rows_csv(outcome.rows, out / f"profile_{outcome.name}.csv")
        console.print(rows_table(outcome.rows, f"{outcome.name} ({csv_path})"))
        if args.plot and outcome.name in PLOT_MODULES:
            png = importlib.import_module(PLOT_MODULES[outcome.name]).plot(
                csv_path, out / f"profile_{outcome.name}.png"
            )
            console.print(f"figure: {png}", markup=False, highlight=False)
    profile = build_profile(
        all_rows,
        topology,
        skipped=[f"{o.name}: {line}" for o in outcomes for line in o.skipped],
        notes=[
            *args.note,
            load_note(),
            *(f"{o.name}: {line}" for o in outcomes for line in o.notes),
        ],
    )
    path = out / PROFILE_NAME
    if path.exists():
        profile = merge_profiles(load_profile(path), profile)
    profile.save(path)
    console.print(profile_table(profile))
    console.print(f"wrote {path}", markup=False, highlight=False)
    return out


def check_options(args: argparse.Namespace, topology: Topology) -> None:
    """Refuse every bad option before the first measurement (``all`` would otherwise fail in its
    third step, or never, for an option only some steps read): ``--trials`` below MIN_TRIALS,
    ``--nodes`` or ``--cpu-node`` naming a node this machine lacks (the message lists those it
    has), a ``--max-size`` beyond this machine's memory.

    >>> check_options(argparse.Namespace(trials=5, nodes=None, cpu_node=None), machine_topology())
    """
    if args.trials < MIN_TRIALS:
        raise OptionError(f"--trials {args.trials}: write at least {MIN_TRIALS}")
    selected_nodes(args, topology)
    if args.cpu_node is not None:
        if args.cpu_node not in topology.node_ids:
            raise OptionError(
                f"--cpu-node {args.cpu_node}: no such NUMA node on "
                f"{topology.name or topology.source}; nodes: {list(topology.node_ids)}"
            )
        cpu_node_cpus(topology, args.cpu_node)
    max_size = getattr(args, "max_size", None)
    if max_size is not None:
        check_fits_machine(parse_size(max_size, what="--max-size"), what=f"--max-size {max_size}")


def run_single(
    args: argparse.Namespace, measure: Callable[[argparse.Namespace, Topology, Console], Outcome]
) -> int:
    """Run one measurement subcommand end to end; the exit code is 0.

    >>> from profilers import cli_latency
    >>> run_single(args, cli_latency.measure)  # doctest: +SKIP
    0
    """
    console = Console()
    topology = machine_topology()
    check_options(args, topology)
    outcome = measure(args, topology, console)
    write_outcomes(args, [outcome], topology, console)
    return 0
