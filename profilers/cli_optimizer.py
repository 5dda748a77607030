"""`offload-profile optimizer`: CPU AdamW ms per step per state placement and size (the paper's).

Wiring only: the step is profilers.optimizer_step, the files and tables profilers.cli_common.
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
    run_single,
    selected_nodes,
)
from profilers.optimizer_step import (
    QUICK_ELEMENTS,
    OptimizerConfig,
    expected_rows,
    measure_optimizer,
)
from profilers.placement_sweep import sweep_placements


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """AdamW on every selected node and a local:CXL 1:1 mix, stepped by ``--cpu-node``'s cores.

    >>> measure(args, machine_topology(), Console()).name  # doctest: +SKIP
    'optimizer'
    """
    cpu_node, cpus = cpu_node_cpus(topology, args.cpu_node)
    placements = sweep_placements(topology, selected_nodes(args, topology), ratios=(1,))
    config = OptimizerConfig(
        placements=placements, cpu_node=cpu_node, threads=len(cpus), trials=args.trials
    )
    if args.quick:
        config = OptimizerConfig(
            placements=placements, cpu_node=cpu_node, threads=len(cpus), trials=args.trials,
            elements=QUICK_ELEMENTS, optimizers=("optim_cpu",),
        )  # fmt: skip
    rows = collect_rows(console, "optimizer", expected_rows(config), measure_optimizer(config))
    return Outcome("optimizer", rows, notes=[f"AdamW threads on node {cpu_node} CPUs {list(cpus)}"])


def register(subparsers) -> None:
    """Add ``optimizer`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["optimizer", "--quick"]).quick
    True
    """
    parser = subparsers.add_parser(
        "optimizer",
        help="CPU AdamW step time per state placement and size (the paper's experiment)",
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
