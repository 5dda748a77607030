"""`offload-profile pinning`: seconds per GiB to allocate, pre-fault and register, per node and
page size. Wiring only: the timing is profilers.pinning_cost, the files profilers.cli_common.
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
from profilers.pinning_cost import PinningConfig, expected_rows, measure_pinning

MIB = 1 << 20


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Allocation cost on every selected node; registration only with CUDA (else a skip line).

    >>> measure(args, machine_topology(), Console()).name  # doctest: +SKIP
    'pinning'
    """
    reason = gpu_skip_reason()
    config = PinningConfig(
        nodes=selected_nodes(args, topology),
        nbytes=(256 if args.quick else 1024) * MIB,
        cuda=reason is None,
        trials=args.trials,
    )
    rows = collect_rows(console, "pinning", expected_rows(config), measure_pinning(config))
    skipped = [f"cudaHostRegister and pin_memory: {reason}"] if reason else []
    return Outcome("pinning", rows, skipped=skipped)


def register(subparsers) -> None:
    """Add ``pinning`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["pinning", "--quick"]).quick
    True
    """
    parser = subparsers.add_parser(
        "pinning", help="seconds per GiB to allocate, pre-fault and register host memory per node"
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
