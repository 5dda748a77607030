"""`offload demo`: the main job on a small default. It reads this machine's tiers, profiles them
(`offload-profile all --quick`), places a pinned buffer, fine-tunes a tiny model under
offload.enable() and prints the report; it holds no measurement or offload logic of its own.
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from allocators.errors import ConfigError
from allocators.host_buffer import HostBuffer, check_fits_machine
from allocators.sysfs_topology import discover
from allocators.table_width import wrap_not_cut
from allocators.topology import Topology
from allocators.topology_table import print_topology
from allocators.units import format_bytes, parse_size
from offload.tools.tiny_finetune import TinyFinetuneResult, run_tiny_finetune
from profilers.cli import main as profile_main

# Plain and offloaded runs do the same arithmetic on CPU; the tests hold them to 1e-6.
LOSS_TOLERANCE = 1e-6


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
    parser.add_argument(
        "--profile-out",
        default=None,
        metavar="DIR",
        help="where `offload-profile all --quick` writes its CSV and profile JSON "
        "(default ./offload-profile-<host>/)",
    )
    parser.add_argument("--steps", type=int, default=8, help="fine-tuning steps (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
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
        return wrap_not_cut(table)
    finally:
        buf.free()


def finetune_table(result: TinyFinetuneResult) -> Table:
    """The offload session's per-step report beside the plain run's losses.

    >>> import pandas as pd
    >>> row = {"step": 0, "forward_ms": 1.0, "backward_ms": 2.0, "optimizer_ms": 0.5,
    ...        "wait_ms": 0.1, "d2h_nbytes": 4096, "h2d_nbytes": 4096}
    >>> finetune_table(TinyFinetuneResult((2.0,), (2.0,), pd.DataFrame([row]))).row_count
    1
    """
    table = Table(title="tiny Llama under offload.enable() (measured on this machine)")
    for column in (
        "step",
        "loss plain",
        "loss offload",
        "fwd ms",
        "bwd ms",
        "optim ms",
        "wait ms",
        "D2H",
        "H2D",
    ):
        table.add_column(column, justify="right")
    for i, row in result.report.iterrows():
        table.add_row(
            str(int(row["step"])),
            f"{result.plain_losses[i]:.6f}",
            f"{result.offload_losses[i]:.6f}",
            *(f"{row[c]:.1f}" for c in ("forward_ms", "backward_ms", "optimizer_ms", "wait_ms")),
            format_bytes(row["d2h_nbytes"]),
            format_bytes(row["h2d_nbytes"]),
        )
    table.caption = f"largest loss difference plain vs offload: {result.max_loss_diff:.2e}"
    return wrap_not_cut(table)


def check_demo_args(args: argparse.Namespace) -> int:
    """Refuse bad arguments before the minute of profiling, not after; returns the buffer bytes.

    >>> check_demo_args(argparse.Namespace(buffer="1MiB", steps=1, seq=8))
    1048576
    """
    for flag in ("steps", "seq"):
        value = getattr(args, flag)
        if value < 1:
            raise ConfigError(f"--{flag} {value} must be at least 1, e.g. --{flag} 8")
    nbytes = parse_size(args.buffer, what="--buffer")
    if nbytes < 1:
        raise ConfigError(f"--buffer {args.buffer} must be at least one byte, e.g. --buffer 256MiB")
    check_fits_machine(nbytes, what=f"--buffer {args.buffer}")
    return nbytes


def run_demo(args: argparse.Namespace) -> int:
    buffer_nbytes = check_demo_args(args)
    console = Console()
    topo = discover()
    print_topology(topo, console)
    # The profiler is its own command with its own tables; the demo runs it as a user would.
    profile_args = ["all", "--quick"] + (["--out", args.profile_out] if args.profile_out else [])
    if profile_main(profile_args) != 0:
        return 1
    console.print(placed_buffer_table(topo, buffer_nbytes))
    with console.status("fine-tuning a tiny Llama, plain and under offload.enable()"):
        result = run_tiny_finetune(steps=args.steps, seq=args.seq, topology=topo)
    console.print(finetune_table(result))
    if result.max_loss_diff > LOSS_TOLERANCE:
        # Offload must not change the numbers: a difference here is a bug, not noise.
        console.print(
            f"[red]offload changed the losses by {result.max_loss_diff:.2e} (more than "
            f"{LOSS_TOLERANCE:.0e}); please report it with the tables above[/red]"
        )
        return 1
    return 0
