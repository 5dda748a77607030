"""`offload-profile contention`: DMA bandwidth while the CPU optimizer runs, and the reverse.

Wiring only: the measurement is profilers.contention_sweep, the files and tables profilers.cli_common.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from allocators.topology import Topology
from profilers.cli_common import (
    Outcome,
    add_common_options,
    collect_rows,
    cpu_node_cpus,
    gpu_skip_reason,
    run_single,
)
from profilers.contention_sweep import ContentionConfig, expected_rows, measure_contention
from profilers.optimizer_step import PAPER_ELEMENTS, QUICK_ELEMENTS

MIB = 1 << 20


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Both directions on ``--cpu-node``; the GPU half is one skip line without a GPU.

    >>> measure(args, machine_topology(), Console()).rows[0].case  # doctest: +SKIP
    'adamw idle'
    """
    node, cpus = cpu_node_cpus(topology, args.cpu_node)
    reason = gpu_skip_reason()
    config = ContentionConfig(
        node=node,
        cpus=cpus,
        elements=QUICK_ELEMENTS[-1] if args.quick else PAPER_ELEMENTS[-1],
        copy_nbytes=(64 if args.quick else 256) * MIB,
        gpu=reason is None,
        trials=args.trials,
    )
    rows = collect_rows(console, "contention", expected_rows(config), measure_contention(config))
    skipped = (
        [f"GPU DMA part: {reason}; the CPU side ran with an emulated DMA copy thread"]
        if reason
        else []
    )
    return Outcome("contention", rows, skipped=skipped)


def register(subparsers) -> None:
    """Add ``contention`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["contention"]).cpu_node is None
    True
    """
    parser = subparsers.add_parser(
        "contention",
        help="DMA GiB/s while the CPU optimizer runs on the same node, and the reverse",
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
