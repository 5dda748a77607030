"""Benchmark: CPU AdamW elements/s with fp32 state, bf16 grads in and bf16 params out: ours
(optim_cpu.CPUAdamW) against torch fused AdamW and DeepSpeedCPUAdam, side by side in one run.

A script, never a test. Each thread count runs in its own subprocess (OMP_NUM_THREADS set before
any OpenMP runtime starts, so DeepSpeed's and torch's pools both get it). Torch and DeepSpeed do
the conversions the way a user would: ``grad.float()`` before the step, ``out.copy_(param)`` after;
ours reads bf16 grads and writes the bf16 copy in its single pass. The roofline is 28 bytes per
element (read p, m, v fp32 + bf16 grad; write p, m, v + bf16 copy) over the bandwidth of the
access pattern Adam has, measured in the same process right before and right after each size
(the better 95th-percentile rate of the two: a ceiling, as STREAM reports its best trial):
profilers' C "update" pass ``a = a * s + b`` (reads two arrays, writes one back in place, so no
write-allocate, 24 bytes per element counted and moved) in as many threads as the optimizers use,
one pinned to each CPU ours may run on. Its two fp64 arrays hold 16 bytes per Adam element, Adam's own footprint
(capped at 1 GiB each), so a size that fits the last-level cache is held to cache bandwidth and a
larger one to DRAM. A STREAM triad is the wrong yardstick: it writes a third array, whose lines
the hardware reads before writing (4 arrays moved, 3 counted), while Adam's in-place writes touch
lines it has just read; only the bf16 copy costs Adam a write-allocate (2 bytes, not counted).
The ``*_step_only`` rows time torch's and DeepSpeed's step alone with fp32 grads already in
place and no bf16 copy (what their kernels do, not what a bf16 pipeline costs); ratios are
against the full-pipeline rows ``torch_fused`` and ``deepspeed``.

    .venv/bin/python experiments/bench_cpu_adam.py                      # all sizes, 2 threads
    .venv/bin/python experiments/bench_cpu_adam.py --threads 1,4,8,16 --sizes 21M,68M
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from optim_cpu.numa_cores import node_cpus
from profilers.kernels import load_kernels
from profilers.memory_bandwidth import stream_stats
from profilers.trial_stats import MIN_TRIALS, TrialStats, summarize

SIZES = {"1.84M": 1_840_000, "21M": 20_970_000, "68M": 67_900_000, "671M": 671_000_000}
ROOFLINE_BYTES_PER_ELEM = 28
# Adam's footprint per element: p, m, v fp32 + bf16 grad + bf16 copy; the update pass gets as much.
FOOTPRINT_BYTES_PER_ELEM = 16
UPDATE_MAX_ARRAY_NBYTES = 1 << 30
# Each update trial moves at least this much, so a cache-sized pass is not timed in microseconds.
UPDATE_MIN_TRIAL_NBYTES = 1 << 30
# Update trials per optimizer trial: the ceiling is a high percentile, which needs more samples
# than a median, and one update trial costs a fraction of a second.
UPDATE_TRIALS_PER_TRIAL = 2
# A 1-minute load average above this means other jobs shared the cores during the run.
SHARED_LOAD = 1.0
# Bytes each implementation holds per element at its peak (state, grads, copies), used to skip
# sizes that do not fit: ours p,m,v + bf16 grad + bf16 out; the others add a fp32 grad.
PEAK_BYTES_PER_ELEM = {"ours": 16, "torch_fused": 20, "deepspeed": 20}
PEAK_BYTES_PER_ELEM |= {"torch_fused_step_only": 16, "deepspeed_step_only": 16}
IMPLS = ("ours", "torch_fused", "deepspeed", "torch_fused_step_only", "deepspeed_step_only")


@dataclass(frozen=True)
class AdamRow:
    """One implementation at one size and thread count; ratios compare rows of the same run."""

    source: str
    machine: str
    impl: str
    n_elems: int
    threads: int
    elems_per_s: float
    step_ms: float
    p5_elems_per_s: float
    p95_elems_per_s: float
    trials: int
    noisy: bool
    update_gib_per_s: float
    update_before_median_gib_per_s: float
    update_after_median_gib_per_s: float
    update_array_nbytes: int
    roofline_fraction: float
    ratio_vs_torch_fused: float | None
    ratio_vs_deepspeed: float | None
    kernel: str
    note: str


def update_stats(n_elems: int, threads: int, trials: int) -> tuple[TrialStats, int, str]:
    """GiB/s of the in-place update pass ``a = a * s + b`` over Adam's footprint, per trial.

    Returns the trial statistics, the bytes of each of its two arrays and a note ("" unless the
    C kernels could not be built and the one-thread numpy fallback measured it instead). Threads
    are pinned one per CPU over the CPUs :class:`optim_cpu.CPUAdamW` pins its workers to.

    >>> update_stats(1 << 16, threads=1, trials=5)[1]  # two arrays of 8 B per element
    524288
    """
    nbytes = min(UPDATE_MAX_ARRAY_NBYTES, n_elems * FOOTPRINT_BYTES_PER_ELEM // 2)
    allowed = node_cpus(None)
    cpus = tuple(allowed[i % len(allowed)] for i in range(threads))
    passes = max(1, -(-UPDATE_MIN_TRIAL_NBYTES // (3 * nbytes)))
    kernels = load_kernels()
    # torch.full writes every page, so no page fault lands inside a timed pass.
    a, b = (torch.full((nbytes // 8,), 1.0, dtype=torch.float64) for _ in range(2))
    stats = stream_stats(
        kernels, "update", (a.data_ptr(), b.data_ptr()), nbytes, cpus, passes=passes, trials=trials
    )
    return stats, nbytes, kernels.note


def _time_steps(step: Callable[[], None], trials: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(trials):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return seconds


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen).bfloat16()
    return param, grad, torch.empty(n, dtype=torch.bfloat16)


def run_ours(n: int, threads: int, trials: int, warmup: int) -> tuple[list[float], str]:
    from optim_cpu import CPUAdamW

    param, grad, out = _inputs(n)
    opt = CPUAdamW([param], lr=1e-3, weight_decay=0.01, threads=threads)
    opt.bind_buffers(param, grad=grad, out=out)
    try:
        return _time_steps(opt.step, trials, warmup), opt.kernel_name
    finally:
        opt.close()


def run_torch_fused(n: int, threads: int, trials: int, warmup: int) -> tuple[list[float], str]:
    param, grad, out = _inputs(n)
    param.requires_grad_()
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)

    def step() -> None:
        param.grad = grad.float()
        opt.step()
        out.copy_(param.detach())

    return _time_steps(step, trials, warmup), "torch._fused_adamw_"


def run_deepspeed(n: int, threads: int, trials: int, warmup: int) -> tuple[list[float], str]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param, grad, out = _inputs(n)
    param = torch.nn.Parameter(param)
    opt = DeepSpeedCPUAdam([param], lr=1e-3, weight_decay=0.01, adamw_mode=True)

    def step() -> None:
        param.grad = grad.float()
        opt.step()
        out.copy_(param.detach())

    return _time_steps(step, trials, warmup), "DeepSpeedCPUAdam"


def run_torch_step_only(n: int, threads: int, trials: int, warmup: int) -> tuple[list[float], str]:
    param, grad, _ = _inputs(n)
    param.requires_grad_()
    param.grad = grad.float()
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)
    return _time_steps(opt.step, trials, warmup), "torch._fused_adamw_, fp32 grads, no copy out"


def run_deepspeed_step_only(
    n: int, threads: int, trials: int, warmup: int
) -> tuple[list[float], str]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param, grad, _ = _inputs(n)
    param = torch.nn.Parameter(param)
    param.grad = grad.float()
    opt = DeepSpeedCPUAdam([param], lr=1e-3, weight_decay=0.01, adamw_mode=True)
    return _time_steps(opt.step, trials, warmup), "DeepSpeedCPUAdam, fp32 grads, no copy out"


RUNNERS = {
    "ours": run_ours,
    "torch_fused": run_torch_fused,
    "deepspeed": run_deepspeed,
    "torch_fused_step_only": run_torch_step_only,
    "deepspeed_step_only": run_deepspeed_step_only,
}


def worker(threads: int, sizes: list[str], trials: int, warmup: int, machine: str) -> None:
    """Measure every implementation at every size with ``threads`` threads; print JSON rows."""
    torch.set_num_threads(threads)
    for label in sizes:
        n = SIZES[label]
        # Measured next to each size, before and after its rows: on a shared machine the
        # bandwidth on offer drifts while the five implementations run.
        update_trials = UPDATE_TRIALS_PER_TRIAL * trials
        before, update_nbytes, kernel_note = update_stats(n, threads, update_trials)
        rows = [_measure(impl, n, threads, trials, warmup, machine) for impl in IMPLS]
        after, _, _ = update_stats(n, threads, update_trials)
        # A roofline is a ceiling: the best rate on offer around the size (STREAM reports its
        # best trial too), the 95th percentile so that one lucky trial does not set it.
        ceiling = max(before.p95, after.p95)
        for row in rows:
            row = replace(
                row,
                update_gib_per_s=ceiling,
                update_before_median_gib_per_s=before.median,
                update_after_median_gib_per_s=after.median,
                update_array_nbytes=update_nbytes,
                roofline_fraction=row.elems_per_s * ROOFLINE_BYTES_PER_ELEM / (ceiling * 2**30),
                note="; ".join(filter(None, (row.note, kernel_note))),
            )
            print(json.dumps(asdict(row)), flush=True)


def _measure(impl: str, n: int, threads: int, trials: int, warmup: int, machine: str) -> AdamRow:
    need = PEAK_BYTES_PER_ELEM[impl] * n
    base = AdamRow("measured", machine, impl, n, threads, 0.0, 0.0, 0.0, 0.0, 0, False,
                   0.0, 0.0, 0.0, 0, 0.0, None, None, "", "")  # fmt: skip
    available = psutil.virtual_memory().available
    if need > 0.8 * available:
        row = replace(base, note=f"skipped: needs {need / 2**30:.1f} GiB, "
                      f"{available / 2**30:.1f} GiB available")  # fmt: skip
    else:
        try:
            seconds, kernel = RUNNERS[impl](n, threads, trials, warmup)
            stats = summarize([n / s for s in seconds])
            row = replace(
                base,
                elems_per_s=stats.median,
                step_ms=1e3 * n / stats.median,
                p5_elems_per_s=stats.p5,
                p95_elems_per_s=stats.p95,
                trials=stats.trials,
                noisy=stats.noisy,
                kernel=kernel,
            )
        except Exception as exc:  # a row that says why beats a crashed sweep
            row = replace(base, note=f"failed: {type(exc).__name__}: {exc}"[:300])
    load = os.getloadavg()[0]
    shared = f"shared machine: 1-min load {load:.2f}" if load > SHARED_LOAD else ""
    gc.collect()
    return replace(row, note="; ".join(filter(None, (row.note, shared))))


def add_ratios(rows: list[AdamRow]) -> list[AdamRow]:
    """Fill ratio columns: each row's elems/s over torch fused's and DeepSpeed's in the same cell."""
    by_key = {(r.impl, r.n_elems, r.threads): r.elems_per_s for r in rows}
    out = []
    for r in rows:
        torch_rate = by_key.get(("torch_fused", r.n_elems, r.threads)) or 0.0
        ds_rate = by_key.get(("deepspeed", r.n_elems, r.threads)) or 0.0
        out.append(
            replace(
                r,
                ratio_vs_torch_fused=r.elems_per_s / torch_rate
                if torch_rate and r.elems_per_s
                else None,
                ratio_vs_deepspeed=r.elems_per_s / ds_rate if ds_rate and r.elems_per_s else None,
            )
        )
    return out


def render(rows: list[AdamRow], console: Console) -> None:
    table = Table(title=f"CPU AdamW, bf16 grads in, bf16 params out ({rows[0].machine})")
    for col in (
        "impl",
        "N",
        "threads",
        "G elem/s",
        "step ms",
        "x torch",
        "x DS",
        "roofline",
        "note",
    ):
        table.add_column(col, justify="left" if col in ("impl", "note") else "right")
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        table.add_row(
            r.impl, f"{r.n_elems / 1e6:.2f}M", str(r.threads),
            f"{r.elems_per_s / 1e9:.3f}" if r.elems_per_s else "-",
            f"{r.step_ms:.2f}" if r.step_ms else "-",
            fmt(r.ratio_vs_torch_fused), fmt(r.ratio_vs_deepspeed),
            f"{r.roofline_fraction:.0%}" if r.elems_per_s else "-", r.note or r.kernel,
        )  # fmt: skip
    console.print(table)
    updates = ", ".join(f"{r.update_gib_per_s:.1f}" for r in rows if r.impl == "ours")
    console.print(
        f"update pass a = a*s + b (C kernel, Adam's footprint, 3 arrays counted), best GiB/s "
        f"around each size: {updates}; roofline = {ROOFLINE_BYTES_PER_ELEM} B/elem over it."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"from {list(SIZES)}")
    parser.add_argument("--threads", default="2", help="comma list, e.g. 1,4,8,16")
    parser.add_argument("--trials", type=int, default=MIN_TRIALS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--machine", default=None, help="results folder name (default: detected)")
    parser.add_argument("--out", default="cpu_adam.csv")
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OpenMP waits for torch and DeepSpeed; PASSIVE suits a shared machine, where "
        "spinning threads lose their cores to other jobs (ACTIVE on a quiet one)",
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes {unknown} unknown; write some of {','.join(SIZES)}")
    machine = args.machine or this_machine()
    if args.worker is not None:
        worker(args.worker, sizes, args.trials, args.warmup, machine)
        return
    rows: list[AdamRow] = []
    for threads in (int(t) for t in args.threads.split(",")):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": args.omp_wait_policy,
        }
        cmd = [sys.executable, __file__, "--worker", str(threads), "--sizes", args.sizes,
               "--trials", str(args.trials), "--warmup", str(args.warmup), "--machine", machine]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 and not lines:
            sys.exit(f"worker for {threads} threads failed:\n{done.stderr[-3000:]}")
        rows.extend(AdamRow(**json.loads(ln)) for ln in lines)
    rows = add_ratios(rows)
    render(rows, Console())
    path = RESULTS_DIR / machine / args.out
    write_results([asdict(r) for r in rows], path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
