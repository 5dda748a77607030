"""`offload-profile latency`: idle load latency per node, page size and buffer size.

Wiring only: the chase is profilers.latency, the files and tables profilers.cli_common.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from allocators.topology import Topology
from profilers.cli_common import (
    Outcome,
    add_common_options,
    collect_rows,
    run_single,
    selected_nodes,
)
from profilers.kernels import load_kernels
from profilers.latency import LatencyConfig, expected_rows, measure_latency


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Chase on every selected node; the numpy fallback is named in a note when in use."""
    nodes = selected_nodes(args, topology)
    config = (
        LatencyConfig.quick(nodes, args.trials)
        if args.quick
        else LatencyConfig(nodes=nodes, trials=args.trials)
    )
    kernels = load_kernels()
    rows = collect_rows(console, "latency", expected_rows(config), measure_latency(config, kernels))
    return Outcome("latency", rows, notes=[kernels.note] if kernels.degraded else [])


def register(subparsers) -> None:
    """Add ``latency`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["latency", "--quick"]).quick
    True
    """
    parser = subparsers.add_parser(
        "latency",
        help="idle load latency per NUMA node (pointer chase, 4 KiB and 2 MiB pages, 16 KiB..1 GiB)",
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
