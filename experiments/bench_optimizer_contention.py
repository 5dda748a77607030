"""Benchmark: the CPU optimizer against concurrent DMA, with and without the contention policy,
to choose optim_cpu.contention.DEFAULT_POLICY from measurements.

A script, never a test. Without a GPU the DMA is EMULATED by a thread doing numpy memcpy of a
512 MiB pinned-size buffer (single-threaded, GIL released) between DmaSignal.begin/end; a memcpy
also takes a core, which a real copy engine does not, so on few cores this overstates the gain
of capping threads. Each policy runs the same fixed work: ``--copies`` buffer copies and
``--steps`` optimizer steps started together; reported are each side's finish time and rate.

    .venv/bin/python experiments/bench_optimizer_contention.py
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from optim_cpu import ContentionPolicy, CPUAdamW, DmaSignal, StepScheduler

COPY_NBYTES = 512 << 20
POLICIES = {
    "none (alone)": None,
    "unrestricted": ContentionPolicy(),
    "cap 1 thread": ContentionPolicy(threads_during_dma=1),
    "duty 50%": ContentionPolicy(duty_cycle_during_dma=0.5),
    "duty 25%": ContentionPolicy(duty_cycle_during_dma=0.25),
    "cap 1 + duty 50%": ContentionPolicy(threads_during_dma=1, duty_cycle_during_dma=0.5),
}


@dataclass(frozen=True)
class ContentionRow:
    """One policy's run of the fixed work; ``dma`` says emulated (memcpy) or real."""

    source: str
    machine: str
    dma: str
    policy: str
    threads: int
    n_elems: int
    steps: int
    copies: int
    optimizer_s: float
    copy_s: float
    makespan_s: float
    optimizer_elems_per_s: float
    copy_gib_per_s: float


def copy_loop(dma: DmaSignal, copies: int, src: np.ndarray, dst: np.ndarray, out: dict) -> None:
    start = time.perf_counter()
    for _ in range(copies):
        with dma.dma_active():
            np.copyto(dst, src)
    out["copy_s"] = time.perf_counter() - start


def run_policy(name: str, args: argparse.Namespace, machine: str) -> ContentionRow:
    dma = DmaSignal()
    policy = POLICIES[name]
    sched = StepScheduler(args.threads, policy=policy, dma=dma)
    param = torch.randn(args.elems)
    opt = CPUAdamW([param], lr=1e-3, scheduler=sched)
    opt.bind_buffers(
        param,
        grad=torch.randn(args.elems).bfloat16(),
        out=torch.empty(args.elems, dtype=torch.bfloat16),
    )
    opt.step()  # warm: workers started, pages touched
    src = np.ones(COPY_NBYTES, dtype=np.uint8)
    dst = np.zeros(COPY_NBYTES, dtype=np.uint8)
    result: dict[str, float] = {"copy_s": 0.0}
    copies = 0 if policy is None else args.copies
    copier = threading.Thread(target=copy_loop, args=(dma, copies, src, dst, result))
    start = time.perf_counter()
    copier.start()
    for _ in range(args.steps):
        opt.step()
    optimizer_s = time.perf_counter() - start
    copier.join()
    makespan_s = time.perf_counter() - start
    sched.close()
    return ContentionRow(
        source="measured",
        machine=machine,
        dma="emulated: numpy memcpy thread",
        policy=name,
        threads=args.threads,
        n_elems=args.elems,
        steps=args.steps,
        copies=copies,
        optimizer_s=optimizer_s,
        copy_s=result["copy_s"],
        makespan_s=makespan_s,
        optimizer_elems_per_s=args.steps * args.elems / optimizer_s,
        copy_gib_per_s=copies * COPY_NBYTES / result["copy_s"] / 2**30 if copies else 0.0,
    )


def copy_alone(args: argparse.Namespace, machine: str) -> ContentionRow:
    src = np.ones(COPY_NBYTES, dtype=np.uint8)
    dst = np.zeros(COPY_NBYTES, dtype=np.uint8)
    np.copyto(dst, src)
    result: dict[str, float] = {}
    copy_loop(DmaSignal(), args.copies, src, dst, result)
    return ContentionRow("measured", machine, "emulated: numpy memcpy thread", "copy alone",
                         0, 0, 0, args.copies, 0.0, result["copy_s"], result["copy_s"], 0.0,
                         args.copies * COPY_NBYTES / result["copy_s"] / 2**30)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elems", type=int, default=20_970_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all policies")
    parser.add_argument("--machine", default=None)
    args = parser.parse_args(argv)
    machine = args.machine or this_machine()
    rows = [copy_alone(args, machine)]
    for _ in range(args.repeats):  # rounds alternate policies so drift hits all alike
        rows.extend(run_policy(name, args, machine) for name in POLICIES)
    frame = pd.DataFrame([asdict(r) for r in rows])
    summary = frame.groupby("policy", sort=False).median(numeric_only=True).reset_index()
    table = Table(title=f"optimizer vs emulated DMA ({machine}, {args.threads} threads)")
    for col in ("policy", "optimizer s", "copy s", "makespan s", "opt G elem/s", "copy GiB/s"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in summary.itertuples():
        table.add_row(r.policy, f"{r.optimizer_s:.2f}", f"{r.copy_s:.2f}", f"{r.makespan_s:.2f}",
                      f"{r.optimizer_elems_per_s / 1e9:.3f}", f"{r.copy_gib_per_s:.1f}")  # fmt: skip
    Console().print(table)
    path = RESULTS_DIR / machine / "optimizer_contention.csv"
    write_results(frame, path)
    print(f"wrote {path} (DMA emulated by a memcpy thread)")


if __name__ == "__main__":
    main()
