"""Benchmark: HostBuffer against torch's pinned memory for H2D/D2H copy speed and allocation time.

A script, never a test: it prints a rich table and writes experiments/results/<machine>/host_buffer.csv.
Without CUDA it measures only allocation (placed, pre-faulted, unpinned) and labels it pinned=False.

    .venv/bin/python experiments/bench_host_buffer.py                  # full run
    .venv/bin/python experiments/bench_host_buffer.py --alloc-gib 1    # smaller allocation case
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.host_buffer import HostBuffer
from allocators.units import format_bytes, parse_size
from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from profilers.trial_stats import MIN_TRIALS, summarize

GiB = 1 << 30
DEFAULT_SIZES = ("1MiB", "4MiB", "16MiB", "64MiB", "256MiB", "1GiB")
# Registration piece for the "split" case: copies above 64 MiB then span several
# cudaHostRegister ranges, which shows whether the driver still treats them as pinned.
SPLIT_REGISTER_NBYTES = 64 << 20


@dataclass(frozen=True)
class BenchRow:
    """One measured case; ``ratio_vs_torch`` compares with the torch row of the same run."""

    source: str
    machine: str
    benchmark: str
    case: str
    direction: str
    nbytes: int
    pinned: bool
    placement: str
    unit: str
    median: float
    p5: float
    p95: float
    trials: int
    noisy: bool
    ratio_vs_torch: float | None
    note: str


def _empty_torch_host_cache() -> None:
    # torch caches freed pinned blocks; without this the next pin_memory=True is a cache hit.
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def alloc_seconds(make: Callable[[], object], trials: int) -> list[float]:
    """Seconds to make a usable buffer (faulted in, pinned when asked), once per trial."""
    samples = []
    for _ in range(trials):
        gc.collect()
        _empty_torch_host_cache()
        start = time.perf_counter()
        buf = make()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
        if isinstance(buf, HostBuffer):
            buf.free()
        del buf
    return samples


def measure_alloc(nbytes: int, node: int, trials: int, pin: bool, machine: str) -> list[BenchRow]:
    """Seconds per GiB: placed HostBuffer (with and without THP) against torch's allocation."""
    baseline = "torch.empty(pin_memory=True)" if pin else "torch.empty+fill_"
    makers: dict[str, Callable[[], object]] = {
        f"hostbuffer(pin={pin})": lambda: HostBuffer(nbytes, placement=node, pin=pin),
        f"hostbuffer(pin={pin},4KiB pages)": lambda: HostBuffer(
            nbytes, placement=node, pin=pin, huge_pages=False
        ),
        baseline: (
            (lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
            if pin
            else (lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(0))
        ),
    }
    samples: dict[str, list[float]] = {case: [] for case in makers}
    for _ in range(trials):  # cases alternate so drift on a shared machine hits all alike
        for case, make in makers.items():
            samples[case] += [s * GiB / nbytes for s in alloc_seconds(make, 1)]
    stats = {case: summarize(values) for case, values in samples.items()}
    ours_note = "mmap+mbind+threaded populate" + ("+cudaHostRegister" if pin else "; no CUDA here")
    notes = {
        f"hostbuffer(pin={pin})": ours_note + "; MADV_HUGEPAGE",
        f"hostbuffer(pin={pin},4KiB pages)": ours_note + "; no THP",
        baseline: "torch baseline" + ("" if pin else "; fill_ faults the pages in"),
    }
    return [
        BenchRow(
            source="measured",
            machine=machine,
            benchmark="alloc",
            case=case,
            direction="-",
            nbytes=nbytes,
            pinned=pin,
            placement=f"node{node}" if case != baseline else "default",
            unit="s/GiB",
            median=st.median,
            p5=st.p5,
            p95=st.p95,
            trials=st.trials,
            noisy=st.noisy,
            ratio_vs_torch=stats[baseline].median / st.median,
            note=notes[case] + "; ratio = torch s/GiB over this (speed-up)",
        )
        for case, st in stats.items()
    ]


def copy_gbps(dst: torch.Tensor, src: torch.Tensor, min_seconds: float = 0.05) -> float:
    """GB/s of ``dst.copy_(src, non_blocking=True)``, repeated for at least ``min_seconds``."""
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 1
    while True:
        start.record()
        for _ in range(iters):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        if seconds >= min_seconds or iters >= 1 << 12:
            return iters * src.numel() * src.element_size() / seconds / 1e9
        iters *= 2


def measure_copies(sizes: list[int], node: int, trials: int, machine: str) -> list[BenchRow]:
    """H2D and D2H GB/s from HostBuffer views and from torch pinned tensors, side by side."""
    largest = max(sizes)
    ours = HostBuffer(largest, placement=node, pin=True)
    split = HostBuffer(
        largest, placement=node, pin=True, register_chunk_nbytes=SPLIT_REGISTER_NBYTES
    )
    theirs = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(largest, dtype=torch.uint8, device="cuda")
    buffers = {"hostbuffer": ours, "hostbuffer_split": split}
    rows = [
        row
        for nbytes in sizes
        for direction in ("H2D", "D2H")
        for row in _copy_rows(buffers, theirs, device, nbytes, direction, node, trials, machine)
    ]
    ours.free()
    split.free()
    return rows


def _copy_rows(
    buffers: dict[str, HostBuffer],
    theirs: torch.Tensor,
    device: torch.Tensor,
    nbytes: int,
    direction: str,
    node: int,
    trials: int,
    machine: str,
) -> list[BenchRow]:
    """One size and direction; the views made here die on return, so the buffers can be freed."""
    hosts = {case: buf.tensor(torch.uint8, (nbytes,)) for case, buf in buffers.items()}
    hosts["torch_pinned"] = theirs[:nbytes]
    pinned = {case: buf.pinned for case, buf in buffers.items()} | {"torch_pinned": True}
    dev = device[:nbytes]
    samples: dict[str, list[float]] = {case: [] for case in hosts}
    for _ in range(trials):  # cases alternate within each trial so drift hits all alike
        for case, host in hosts.items():
            samples[case].append(
                copy_gbps(dev, host) if direction == "H2D" else copy_gbps(host, dev)
            )
    stats = {case: summarize(values) for case, values in samples.items()}
    return [
        BenchRow(
            source="measured",
            machine=machine,
            benchmark="copy",
            case=case,
            direction=direction,
            nbytes=nbytes,
            pinned=pinned[case],
            placement=f"node{node}",
            unit="GB/s",
            median=st.median,
            p5=st.p5,
            p95=st.p95,
            trials=st.trials,
            noisy=st.noisy,
            ratio_vs_torch=st.median / stats["torch_pinned"].median,
            note=(
                f"registered in {format_bytes(SPLIT_REGISTER_NBYTES)} pieces"
                if case == "hostbuffer_split"
                else ""
            ),
        )
        for case, st in stats.items()
    ]


def print_table(rows: list[BenchRow], console: Console) -> None:
    table = Table(title="HostBuffer vs torch pinned memory (measured)")
    for column in ("benchmark", "case", "dir", "size", "pinned", "median", "p5..p95", "vs torch"):
        table.add_column(column, justify="right" if column in ("size", "median") else "left")
    for r in rows:
        ratio = "" if r.ratio_vs_torch is None else f"{r.ratio_vs_torch:.2f}x"
        table.add_row(
            r.benchmark,
            r.case,
            r.direction,
            format_bytes(r.nbytes),
            str(r.pinned),
            f"{r.median:.3g} {r.unit}" + (" (noisy)" if r.noisy else ""),
            f"{r.p5:.3g}..{r.p95:.3g}",
            ratio,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), help="copy sizes")
    parser.add_argument("--alloc-gib", type=float, default=4.0, help="allocation case size")
    parser.add_argument("--trials", type=int, default=MIN_TRIALS, help=f">= {MIN_TRIALS}")
    parser.add_argument("--node", type=int, default=0, help="NUMA node to place buffers on")
    parser.add_argument("--machine", default=None, help="results folder name (default: derived)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: results/...)")
    parser.add_argument("--note", default="", help="added to every row, e.g. 'shared, loaded'")
    args = parser.parse_args(argv)
    # A file or pipe gets a wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 150)
    machine = args.machine or this_machine()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()  # context creation is not part of any measured case
    else:
        console.print(
            "[yellow]CUDA is not available: copy speeds and pinning are skipped; measuring "
            "allocation of placed, pre-faulted, unpinned buffers only (pinned=False).[/]"
        )
    alloc_nbytes = int(args.alloc_gib * GiB)
    rows = measure_alloc(alloc_nbytes, args.node, args.trials, pin=cuda, machine=machine)
    if cuda:
        sizes = [parse_size(s, what="--sizes") for s in args.sizes]
        rows += measure_copies(sizes, args.node, args.trials, machine)
    print_table(rows, console)
    out = args.out or RESULTS_DIR / machine / "host_buffer.csv"
    frame = pd.DataFrame([asdict(r) for r in rows])
    if args.note:
        frame["note"] = frame["note"] + "; " + args.note
    frame.insert(2, "torch", torch.__version__)
    frame.insert(3, "cpus", len(os.sched_getaffinity(0)))
    write_results(frame, out)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
