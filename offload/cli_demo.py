"""`offload demo`: the main job on a small default. It reads this machine's tiers, places a pinned
buffer on the GPU's local node and checks where its pages landed; it owns no measurement logic.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from allocators.host_buffer import HostBuffer
from allocators.sysfs_topology import discover
from allocators.topology import Topology
from allocators.topology_table import print_topology
from allocators.units import format_bytes, parse_size


def register(subparsers) -> None:
    """Add ``demo [--buffer SIZE]`` to the ``offload`` CLI."""
    parser = subparsers.add_parser(
        "demo",
        help="profile this machine, place a buffer, fine-tune a tiny model under offload.enable()",
        description="The main job on a small default; every figure it prints is measured here.",
    )
    parser.add_argument(
        "--buffer", default="256MiB", metavar="SIZE", help="placed buffer size (default 256MiB)"
    )
    parser.set_defaults(func=run_demo)


def placed_buffer_table(topo: Topology, nbytes: int) -> Table:
    """Place ``nbytes`` on the local DRAM node, pre-fault and pin it, and report where pages are.

    >>> from allocators.sysfs_topology import discover
    >>> placed_buffer_table(discover(), 1 << 20).row_count
    1
    """
    node = topo.tiers.local_dram[0].id
    start = time.perf_counter()
    buf = HostBuffer(nbytes, placement=node)
    try:
        seconds = time.perf_counter() - start
        pages = buf.pages_per_node()
        table = Table(title=f"placed buffer (measured on this machine, {topo.name or topo.source})")
        for column in ("size", "placement", "pages per node", "pinned", "s per GiB to make"):
            table.add_column(column)
        table.add_row(
            format_bytes(buf.nbytes),
            str(buf.placement)
            + ("" if buf.placement_enforced else f" (not enforced: {buf.fallback_reason})"),
            ", ".join(f"node{n}: {count}" for n, count in sorted(pages.items())),
            "yes" if buf.pinned else f"no ({buf.pin_reason})",
            f"{seconds / (buf.nbytes / 2**30):.3f}",
        )
        return table
    finally:
        buf.free()


def run_demo(args: argparse.Namespace) -> int:
    console = Console()
    topo = discover()
    print_topology(topo, console)
    console.print(placed_buffer_table(topo, parse_size(args.buffer, what="--buffer")))
    return 0
