"""What the live dashboard costs the tiny Llama's training step under offload.enable(), resolved on a
loaded machine. Prints a table and writes CSV; it never runs in the tests and asserts nothing.

One session, one model: many short rounds, each timing ``--steps`` steps with the dashboard off,
drawing the live panel (at each ``--live-refresh-per-s`` rate), and writing log lines, in an order
rotated per round, so on and off
alternate within seconds of each other and the machine's drift cancels within each round. Per mode:
- the median over rounds of the round's own step-time ratio to ``off`` (minus 1), with a bootstrap
  95% confidence interval of that median (rounds resampled);
- the direct cost: the dashboard thread's own CPU time (its per-thread CPU clock) during the timed
  steps over their wall time; and, as an upper bound, its CPU over its whole life (starting Live
  and the last draw at stop, which a real run pays once, not per round). With the GIL this also
  bounds the time it can take the interpreter from the training thread;
- the time the training side (every thread but the dashboard's) spent blocked on the one lock the
  dashboard takes, the host allocator's (read for the memory bars), timed by a wrapper around it.
The dashboard is the DashboardThread that ``enable(dashboard=True)`` starts, started and stopped
on the running session per round, drawing into /dev/null (the live panel with a forced terminal).

    python experiments/bench_dashboard_overhead.py
    python experiments/bench_dashboard_overhead.py --rounds 20 --steps 6 --svg /tmp/dashboard.svg
    python experiments/bench_dashboard_overhead.py --device cuda --svg docs/dashboard_gpu.svg
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import offload
from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from offload.tools.dashboard import render_dashboard
from offload.tools.dashboard_thread import DashboardThread
from offload.tools.tiny_finetune import tiny_llama, train_steps

DASHBOARD_THREAD = "offload-dashboard"
NOTE = "shared 2-core VM: other engineers ran tests and benchmarks on the same cores meanwhile"


class TimedLock:
    """A lock that counts, per thread name, how often it was taken, how often it was held by
    another thread then, and the seconds spent waiting for it.

    >>> lock = TimedLock(threading.Lock())
    >>> with lock:
    ...     pass
    >>> lock.acquires, lock.contended, lock.blocked_s
    ({'MainThread': 1}, {}, {})
    """

    def __init__(self, inner: threading.Lock) -> None:
        self._inner = inner
        self.acquires: dict[str, int] = {}
        self.blocked_s: dict[str, float] = {}
        self.contended: dict[str, int] = {}

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock; a wait (only when another thread holds it) is timed."""
        name = threading.current_thread().name
        if self._inner.acquire(False):
            self.acquires[name] = self.acquires.get(name, 0) + 1
            return True
        if not blocking:
            return False
        start = time.perf_counter()
        taken = self._inner.acquire(True, timeout)
        if taken:
            self.acquires[name] = self.acquires.get(name, 0) + 1
        self.blocked_s[name] = self.blocked_s.get(name, 0.0) + time.perf_counter() - start
        self.contended[name] = self.contended.get(name, 0) + 1
        return taken

    def release(self) -> None:
        """Release the lock."""
        self._inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def training_blocked_s(self) -> float:
        """Seconds every thread but the dashboard's waited for the lock."""
        return sum(s for name, s in self.blocked_s.items() if name != DASHBOARD_THREAD)

    def counts(self) -> tuple[int, int, int]:
        """Acquisitions by the training side, by the dashboard, and contended ones of training's."""
        training = sum(n for name, n in self.acquires.items() if name != DASHBOARD_THREAD)
        contended = sum(n for name, n in self.contended.items() if name != DASHBOARD_THREAD)
        return training, self.acquires.get(DASHBOARD_THREAD, 0), contended


@dataclass
class ModeTotals:
    """One mode's rounds: seconds per step each round, and the dashboard's summed costs:
    its CPU seconds during the timed steps, and over its whole life (start and last draw too)."""

    step_s_by_round: list[float] = field(default_factory=list)
    timed_s: float = 0.0
    steps: int = 0
    dashboard_cpu_s: float = 0.0
    dashboard_window_cpu_s: float = 0.0
    training_blocked_s: float = 0.0
    training_acquires: int = 0
    dashboard_acquires: int = 0
    training_contended: int = 0


def console_for(mode: str, sink) -> Console:
    """Where a mode draws: a forced terminal (live panel) or a plain file (log lines)."""
    return Console(file=sink, force_terminal=mode.startswith("live"), width=100)


def time_round(
    sess, mode: str, batches, lock: TimedLock, totals: ModeTotals, sink, refresh_per_s: float
) -> None:
    """Time ``len(batches)`` steps of ``sess``'s model under ``mode``; add them to ``totals``."""
    dashboard = None
    if mode != "off":
        # The session's own OptimizerOffload, so elements/s is read as enable() would read it.
        dashboard = DashboardThread(
            sess,
            sess.optimizer_offload,
            console=console_for(mode, sink),
            refresh_per_s=refresh_per_s,
        )
        dashboard.start()
    blocked_before = lock.training_blocked_s()
    counts_before = lock.counts()
    cpu_before_s = dashboard.cpu_time_s() if dashboard else 0.0
    start = time.perf_counter()
    train_steps(sess.model, sess.optimizer, batches)
    elapsed_s = time.perf_counter() - start
    if dashboard is not None:
        totals.dashboard_window_cpu_s += dashboard.cpu_time_s() - cpu_before_s
        dashboard.stop()
        totals.dashboard_cpu_s += dashboard.cpu_s
    totals.step_s_by_round.append(elapsed_s / len(batches))
    totals.timed_s += elapsed_s
    totals.steps += len(batches)
    totals.training_blocked_s += lock.training_blocked_s() - blocked_before
    training, dashboard_count, contended = (
        after - before for after, before in zip(lock.counts(), counts_before, strict=True)
    )
    totals.training_acquires += training
    totals.dashboard_acquires += dashboard_count
    totals.training_contended += contended


def bootstrap_median_ci(
    values: list[float], resamples: int = 5000, seed: int = 0
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the median of ``values``.

    >>> low, high = bootstrap_median_ci([0.01, 0.02, 0.03, 0.02, 0.01])
    >>> 0.01 <= low <= high <= 0.03
    True
    """
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[picks], axis=1)
    return float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def mode_rates(args: argparse.Namespace) -> dict[str, float]:
    """Each mode and its dashboard's redraws (or polls) a second; ``off`` has none (0).

    >>> mode_rates(argparse.Namespace(live_refresh_per_s=[2.0, 4.0], refresh_per_s=2.0))
    {'off': 0.0, 'live_2hz': 2.0, 'live_4hz': 4.0, 'log_lines': 2.0}
    """
    live = {f"live_{rate:g}hz": rate for rate in args.live_refresh_per_s}
    return {"off": 0.0, **live, "log_lines": args.refresh_per_s}


def measure(args: argparse.Namespace) -> dict[str, ModeTotals]:
    """Every mode once per round, order rotated per round, all in one session."""
    gen = torch.Generator().manual_seed(1)
    device = torch.device(args.device)
    model = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        for _ in range(args.steps)
    ]
    rates = mode_rates(args)
    modes = tuple(rates)
    totals = {mode: ModeTotals() for mode in modes}
    with (
        open(os.devnull, "w") as sink,
        offload.enable(model, optimizer, budgets={"dram": "2GiB"}) as sess,
    ):
        allocator = sess.memory.allocator
        # The allocator's lock is the only one SessionProbe takes (usage() for the memory bars).
        lock = allocator._lock = TimedLock(allocator._lock)
        train_steps(model, optimizer, batches[: args.warmup])
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                time_round(sess, mode, batches, lock, totals[mode], sink, rates[mode])
            off = totals["off"].step_s_by_round[-1]
            print(
                f"round {r}: "
                + ", ".join(
                    f"{m} {totals[m].step_s_by_round[-1] * 1e3:.1f} ms/step"
                    + ("" if m == "off" else f" ({totals[m].step_s_by_round[-1] / off - 1:+.1%})")
                    for m in modes
                ),
                flush=True,
            )
        if args.svg is not None:
            dashboard = DashboardThread(
                sess, sess.optimizer_offload, console=console_for("live", sink)
            )
            dashboard.start()
            train_steps(model, optimizer, batches)
            # Let the thread poll the last steps, so the panel's rates include them.
            time.sleep(2 * dashboard.period_s)
            write_svg(dashboard, args.svg, device)
            dashboard.stop()
    return totals


def write_svg(dashboard: DashboardThread, path: Path, device: torch.device) -> None:
    """The panel the dashboard would draw now, recorded as SVG, titled with where it ran."""
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render_dashboard(dashboard.probe.latest()))
    path.parent.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.save_svg(str(path), title=f"offload.enable(..., dashboard=True): tiny Llama on {where}")


def summarize(totals: dict[str, ModeTotals], args: argparse.Namespace) -> list[dict]:
    """One CSV row per mode: paired overhead with its interval, and the direct costs."""
    base = totals["off"].step_s_by_round
    rates = mode_rates(args)
    rows = []
    for mode, t in totals.items():
        overhead = [s / b - 1.0 for s, b in zip(t.step_s_by_round, base, strict=True)]
        low, high = bootstrap_median_ci(overhead) if mode != "off" else (0.0, 0.0)
        rows.append(
            {
                "source": "measured",
                "machine": this_machine(),
                "mode": mode,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "batch": args.batch,
                "seq": args.seq,
                "hidden": args.hidden,
                "layers": args.layers,
                "median_step_ms": statistics.median(t.step_s_by_round) * 1e3,
                "min_step_ms": min(t.step_s_by_round) * 1e3,
                "max_step_ms": max(t.step_s_by_round) * 1e3,
                "paired_overhead_median_fraction": statistics.median(overhead),
                "paired_overhead_ci95_low_fraction": low,
                "paired_overhead_ci95_high_fraction": high,
                "dashboard_cpu_ms_per_step": t.dashboard_window_cpu_s / t.steps * 1e3,
                "dashboard_cpu_fraction_of_step_wall": t.dashboard_window_cpu_s / t.timed_s,
                "dashboard_cpu_with_start_stop_fraction_of_step_wall": t.dashboard_cpu_s
                / t.timed_s,
                "training_lock_blocked_ms": t.training_blocked_s * 1e3,
                "training_lock_blocked_fraction_of_step_wall": t.training_blocked_s / t.timed_s,
                "training_lock_acquires": t.training_acquires,
                "training_lock_contended_acquires": t.training_contended,
                "dashboard_lock_acquires": t.dashboard_acquires,
                "refresh_per_s": rates[mode],
                "torch_threads": torch.get_num_threads(),
                "note": args.note,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table, write the CSV under experiments/results/<machine>/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before round 0")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument(
        "--live-refresh-per-s",
        type=float,
        nargs="+",
        default=[2.0, 4.0],
        help="one live mode per rate (redraws a second); 2 is DashboardThread's default",
    )
    parser.add_argument(
        "--refresh-per-s", type=float, default=2.0, help="log_lines polls a second (default 2)"
    )
    parser.add_argument("--svg", type=Path, default=None, help="write a live panel here at the end")
    parser.add_argument(
        "--device", default="cpu", help="where the model trains: cpu (default) or cuda"
    )
    parser.add_argument("--note", default=NOTE, help="stored with each row")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default: results/)")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.steps < 1 or args.warmup > args.steps:
        parser.error("need --rounds >= 2, --steps >= 1 and --warmup <= --steps")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    totals = measure(args)
    rows = summarize(totals, args)
    path = args.out or RESULTS_DIR / this_machine() / "dashboard_overhead.csv"
    write_results(rows, path)
    print(
        f"\n{'mode':<10} {'ms/step':>8} {'overhead [95% CI]':>26} {'dash CPU/step wall':>19} "
        f"{'lock blocked':>13}"
    )
    for row in rows:
        interval = (
            f"{row['paired_overhead_median_fraction']:+.2%} "
            f"[{row['paired_overhead_ci95_low_fraction']:+.2%}, "
            f"{row['paired_overhead_ci95_high_fraction']:+.2%}]"
        )
        print(
            f"{row['mode']:<10} {row['median_step_ms']:>8.1f} {interval:>26} "
            f"{row['dashboard_cpu_fraction_of_step_wall']:>19.3%} "
            f"{row['training_lock_blocked_fraction_of_step_wall']:>13.4%}"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
