"""Benchmark: the runtime's CPU step scheduled around its own copies, with the contention policy on
and off, side by side in one run: step time and copy rate while both run.

A script, never a test. It drives the pieces offload.enable() wires together: a CopyStreams whose
DMA signal the host step's scheduler reads, and a HostStep (optim_cpu's AdamW over fp32 masters,
bf16 grads in and params out). A copy thread keeps copying ``--copy-mib`` buffers through the
streams for as long as the steps run. Without a GPU the DMA is EMULATED: the copies are torch
copies on that thread (torch limited to one thread so it stands for one copy engine), which also
take a core a GPU copy engine does not. With ``--device cuda`` they are real H2D and D2H copies
between pinned host memory and the GPU, and the signal comes from their events.

"on" is the policy ``contention="auto"`` picks where the profile shows DMA slowed: half the
workers (at least one) step while a copy moves data. Rounds alternate off and on so drift hits
both alike; the ratio columns are on / off from the same run.

    .venv/bin/python experiments/bench_contention_runtime.py
    python experiments/bench_contention_runtime.py --device cuda --threads 8     # GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from offload.runtime.host_step import HostStep
from offload.runtime.streams import CopyStreams
from optim_cpu import ContentionPolicy

MIB, GIB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class RuntimeContentionRow:
    """One round of one policy: steps and copies run together; ``*_vs_off`` are on / off.
    ``load_avg_1min`` is the machine's load when the round ended (others' jobs included)."""

    source: str
    machine: str
    dma: str
    policy: str
    round: int
    threads: int
    dma_threads: int
    n_elems: int
    steps: int
    copy_nbytes: int
    step_ms: float
    copy_gib_per_s: float
    paced_ms_per_step: float
    load_avg_1min: float
    step_ms_vs_off: float = float("nan")
    copy_gib_per_s_vs_off: float = float("nan")


class CopyLoop:
    """A thread copying through ``streams`` until stopped; counts bytes and seconds."""

    def __init__(self, streams: CopyStreams, nbytes: int) -> None:
        self.streams = streams
        cuda = streams.is_cuda
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.host_back = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.device = torch.ones(nbytes, dtype=torch.uint8, device=streams.device)
        self.nbytes = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emulated-dma", daemon=True)

    def start(self) -> CopyLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            # One H2D and one D2H at once (both copy engines on a GPU; two copies on CPU).
            up = self.streams.h2d(self.host, self.device, wait_compute=False)
            down = self.streams.d2h(self.device, self.host_back)
            up.synchronize()
            down.synchronize()
            self.nbytes += 2 * self.host.numel()
        self.seconds = time.perf_counter() - start


def host_step(
    n_elems: int, threads: int, policy: ContentionPolicy | None, streams: CopyStreams
) -> tuple[HostStep, torch.Tensor]:
    """A HostStep over one master of ``n_elems`` (AdamW), bound to bf16 grad and output buffers."""
    user = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(n_elems))], lr=1e-3)
    master = torch.randn(n_elems)
    step = HostStep(user, [[master]], threads=threads, contention=policy, dma=streams.dma)
    step.bind(master, torch.randn(n_elems).bfloat16(), torch.empty(n_elems, dtype=torch.bfloat16))
    return step, master


def run_round(
    name: str, policy: ContentionPolicy | None, args: argparse.Namespace, round_: int
) -> RuntimeContentionRow:
    device = torch.device(args.device)
    streams = CopyStreams(device)
    step, master = host_step(args.elems, args.threads, policy, streams)
    step.step([master]).result()  # warm: workers started, state pages touched
    copies = CopyLoop(streams, args.copy_mib * MIB).start()
    paced_before = step.scheduler.paced_ms
    start = time.perf_counter()
    for _ in range(args.steps):
        step.step([master]).result()
    step_s = time.perf_counter() - start
    copies.stop()
    paced_ms = step.scheduler.paced_ms - paced_before
    dma_threads = step.scheduler.dma_threads
    step.close()
    streams.collect()
    return RuntimeContentionRow(
        source="measured",
        machine=args.machine,
        dma="real: CUDA copy streams" if streams.is_cuda else "emulated: torch copy thread",
        policy=name,
        round=round_,
        threads=args.threads,
        dma_threads=dma_threads,
        n_elems=args.elems,
        steps=args.steps,
        copy_nbytes=args.copy_mib * MIB,
        step_ms=step_s / args.steps * 1e3,
        copy_gib_per_s=copies.nbytes / copies.seconds / GIB if copies.seconds else 0.0,
        paced_ms_per_step=paced_ms / args.steps,
        load_avg_1min=os.getloadavg()[0],
    )


def with_ratios(rows: list[RuntimeContentionRow]) -> list[RuntimeContentionRow]:
    """Each "on" row gets on / off against the "off" row of its round."""
    off = {r.round: r for r in rows if r.policy == "off"}
    result = []
    for r in rows:
        base = off[r.round]
        result.append(
            RuntimeContentionRow(
                **{
                    **asdict(r),
                    "step_ms_vs_off": r.step_ms / base.step_ms,
                    "copy_gib_per_s_vs_off": r.copy_gib_per_s / base.copy_gib_per_s
                    if base.copy_gib_per_s
                    else float("nan"),
                }
            )
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (emulated DMA) or cuda (real DMA)")
    parser.add_argument("--elems", type=int, default=20_971_520, help="AdamW elements per step")
    parser.add_argument("--steps", type=int, default=8, help="steps per round")
    parser.add_argument("--threads", type=int, default=2, help="CPU optimizer workers")
    parser.add_argument("--copy-mib", type=int, default=64, help="MiB per copy")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each off then on")
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    args.machine = args.machine or this_machine()
    if args.device == "cpu":
        # One torch thread: the emulated copy stands for one copy engine, not a parallel memcpy.
        torch.set_num_threads(1)
    policies = {"off": None, "on": ContentionPolicy(threads_during_dma=max(1, args.threads // 2))}
    rows = with_ratios(
        [
            run_round(name, policy, args, round_)
            for round_ in range(args.rounds)
            for name, policy in policies.items()
        ]
    )
    dma = rows[0].dma
    title = (
        f"CPU step vs DMA in the runtime, measured on {args.machine}, {dma.split(':')[0]} DMA "
        f"({args.threads} workers, {args.elems / 1e6:.1f}M elements, medians of {args.rounds})"
    )
    table = Table(title=title)
    for col in ("policy", "workers in DMA", "step ms", "copy GiB/s", "paced ms/step",
                "step on/off", "copy on/off"):  # fmt: skip
        table.add_column(col, justify="left" if col == "policy" else "right")
    for name in policies:
        mine = [r for r in rows if r.policy == name]

        def median(key: str, mine=mine) -> float:
            return statistics.median(getattr(r, key) for r in mine)

        table.add_row(name, str(mine[0].dma_threads), f"{median('step_ms'):.1f}",
                      f"{median('copy_gib_per_s'):.2f}", f"{median('paced_ms_per_step'):.1f}",
                      f"{median('step_ms_vs_off'):.3f}", f"{median('copy_gib_per_s_vs_off'):.3f}")  # fmt: skip
    Console(width=100).print(table)
    path = RESULTS_DIR / args.machine / "contention_runtime.csv"
    write_results([asdict(r) for r in rows], path)
    print(f"wrote {path} (measured on {args.machine}, {dma} DMA)")


if __name__ == "__main__":
    main()
