"""`offload-profile bandwidth`: H2D/D2H/both GiB/s between the GPU and host buffers per node and mix.

Wiring only: the copies are profilers.dma_bandwidth, the files and tables profilers.cli_common.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from allocators.topology import Topology
from profilers.cli_common import (
    Outcome,
    add_common_options,
    collect_rows,
    gpu_skip_reason,
    run_single,
    selected_nodes,
)
from profilers.dma_bandwidth import BandwidthConfig, expected_rows, measure_bandwidth
from profilers.placement_sweep import sweep_placements


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Copy against every selected node and local:CXL mix; one skip line without a GPU.

    >>> measure(args, machine_topology(), Console()).skipped  # doctest: +SKIP
    ['no CUDA GPU: torch 2.13.0+cpu is a CPU-only build']
    """
    reason = gpu_skip_reason()
    if reason:
        return Outcome("bandwidth", skipped=[reason])
    placements = sweep_placements(topology, selected_nodes(args, topology))
    if args.quick:
        config = BandwidthConfig.quick(placements, args.trials)
    else:
        config = BandwidthConfig(placements=placements, trials=args.trials)
    rows = collect_rows(console, "bandwidth", expected_rows(config), measure_bandwidth(config))
    return Outcome("bandwidth", rows)


def register(subparsers) -> None:
    """Add ``bandwidth`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["bandwidth", "--nodes", "0"]).nodes
    '0'
    """
    parser = subparsers.add_parser(
        "bandwidth",
        help="GPU copy GiB/s (H2D, D2H, both) per NUMA node and local:CXL mix, pinned and pageable",
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
