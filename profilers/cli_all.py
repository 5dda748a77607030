"""`offload-profile all`: every measurement in one run, one profile JSON, one CSV per measurement.

Wiring only: it calls each subcommand's ``measure`` in turn and writes through profilers.cli_common.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from profilers import (
    cli_bandwidth,
    cli_contention,
    cli_latency,
    cli_memory,
    cli_optimizer,
    cli_pinning,
)
from profilers.cli_common import (
    add_common_options,
    check_options,
    machine_topology,
    write_outcomes,
)

# Cheap and idle-machine-sensitive measurements first: latency is the most easily disturbed.
STEPS = (cli_latency, cli_memory, cli_bandwidth, cli_pinning, cli_optimizer, cli_contention)


def run_all(args: argparse.Namespace) -> int:
    """Run every step, then write all files and tables; print the total time.

    >>> from profilers.cli import main
    >>> main(["all", "--quick"])  # doctest: +SKIP
    0
    """
    console = Console()
    start = time.perf_counter()
    topology = machine_topology()
    check_options(args, topology)
    outcomes = [step.measure(args, topology, console) for step in STEPS]
    write_outcomes(args, outcomes, topology, console)
    console.print(
        f"all{' --quick' if args.quick else ''} took {time.perf_counter() - start:.1f} s",
        highlight=False,
    )
    return 0


def register(subparsers) -> None:
    """Add ``all`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["all", "--quick"]).quick
    True
    """
    parser = subparsers.add_parser(
        "all", help="latency, memory, bandwidth, pinning, optimizer and contention in one run"
    )
    add_common_options(parser)
    cli_latency.add_max_size_option(parser)
    parser.set_defaults(func=run_all)
