"""`offload-profile latency`: idle load latency per node, page size and buffer size.

Wiring only: the chase is profilers.latency, the files and tables profilers.cli_common.
"""

from __future__ import annotations

import argparse
import dataclasses

from rich.console import Console

from allocators.topology import Topology
from allocators.units import parse_size
from profilers.cli_common import (
    OptionError,
    Outcome,
    add_common_options,
    collect_rows,
    run_single,
    selected_nodes,
)
from profilers.kernels import load_kernels
from profilers.latency import LatencyConfig, expected_rows, measure_latency, sizes_up_to


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Chase on every selected node; the numpy fallback is named in a note when in use.

    >>> measure(args, machine_topology(), Console()).name  # doctest: +SKIP
    'latency'
    """
    nodes = selected_nodes(args, topology)
    if args.quick:
        config = LatencyConfig.quick(nodes, args.trials)
    else:
        config = LatencyConfig(nodes=nodes, trials=args.trials)
    try:
        sizes = sizes_up_to(config.sizes, parse_size(args.max_size, what="--max-size"))
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    config = dataclasses.replace(config, sizes=sizes)
    kernels = load_kernels()
    rows = collect_rows(console, "latency", expected_rows(config), measure_latency(config, kernels))
    return Outcome("latency", rows, notes=[kernels.note] if kernels.degraded else [])


def add_max_size_option(parser: argparse.ArgumentParser) -> None:
    """``--max-size``: the largest chase buffer (also offered by ``all``).

    >>> parser = argparse.ArgumentParser()
    >>> add_max_size_option(parser)
    >>> parser.parse_args([]).max_size
    '1GiB'
    """
    parser.add_argument(
        "--max-size",
        default="1GiB",
        help="largest latency chase buffer (default 1GiB; keep it well past the LLC)",
    )


def register(subparsers) -> None:
    """Add ``latency`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["latency", "--quick", "--max-size", "256MiB"]).max_size
    '256MiB'
    """
    parser = subparsers.add_parser(
        "latency",
        help="idle load latency per NUMA node (pointer chase, 4 KiB and 2 MiB pages, 16 KiB..1 GiB)",
    )
    add_common_options(parser)
    add_max_size_option(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
