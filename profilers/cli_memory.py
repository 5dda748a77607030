"""`offload-profile memory`: CPU read/write/copy/triad GiB/s per node and thread count.

Wiring only: the kernels are profilers.memory_bandwidth, the files and tables profilers.cli_common.
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
from profilers.kernels import load_kernels
from profilers.memory_bandwidth import (
    MemoryConfig,
    default_array_nbytes,
    expected_rows,
    measure_memory,
)


def measure(args: argparse.Namespace, topology: Topology, console: Console) -> Outcome:
    """Stream over every selected node with threads pinned to ``--cpu-node``'s cores.

    >>> measure(args, machine_topology(), Console()).name  # doctest: +SKIP
    'memory'
    """
    nodes = selected_nodes(args, topology)
    cpu_node, cpus = cpu_node_cpus(topology, args.cpu_node)
    counts = (1, len(cpus)) if args.quick else ()
    config = MemoryConfig(
        nodes=nodes,
        cpus=cpus,
        nbytes=default_array_nbytes(args.quick),
        threads=tuple(sorted(set(counts))),
        trials=args.trials,
    )
    kernels = load_kernels()
    rows = collect_rows(
        console, "memory", expected_rows(config, kernels), measure_memory(config, kernels)
    )
    notes = [f"threads pinned to node {cpu_node} CPUs {list(cpus)}"]
    if kernels.degraded:
        notes.append(kernels.note)
    return Outcome("memory", rows, notes=notes)


def register(subparsers) -> None:
    """Add ``memory`` to the ``offload-profile`` parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["memory", "--cpu-node", "1"]).cpu_node
    1
    """
    parser = subparsers.add_parser(
        "memory", help="CPU read/write/copy/triad GiB/s per NUMA node and thread count"
    )
    add_common_options(parser)
    parser.set_defaults(func=lambda args: run_single(args, measure))
