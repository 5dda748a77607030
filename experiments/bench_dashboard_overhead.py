"""What the live dashboard costs: steps/s of the tiny Llama under offload.enable() with the dashboard
off, drawing the live panel, and writing log lines, side by side in one run. Prints a table and
writes CSV; it never runs in the tests, and asserts nothing about the numbers.

Modes run back to back in each round, their order rotated, and the overhead is the median over
rounds of each round's own ratio to ``off``, so drift on a shared machine cancels within a pair;
each round builds the model afresh from the same seed and drops ``--warmup`` steps. Beside the
ratio, the dashboard thread's own CPU time per wall second of the session: the cost with the
machine's other load taken out.
The live panel draws into /dev/null through the real enable(dashboard=True) path (TTY_COMPATIBLE=1
makes rich treat it as a terminal). ``--svg`` also writes the panel of the last live run as SVG.

    python experiments/bench_dashboard_overhead.py
    python experiments/bench_dashboard_overhead.py --rounds 5 --steps 20 --svg /tmp/dashboard.svg
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

import offload
from experiments.results_io import RESULTS_DIR, this_machine, write_results
from offload.dashboard import render_dashboard
from offload.tiny_finetune import tiny_llama

MODES = ("off", "live", "log_lines")
TTY_FOR_MODE = {"off": None, "live": "1", "log_lines": "0"}


@dataclass(frozen=True)
class RoundResult:
    """One run of one mode: steps/s over the timed steps, and the dashboard thread's CPU time
    over the session's wall time (0 when off)."""

    steps_per_s: float
    dashboard_cpu_fraction: float


@dataclass(frozen=True)
class ModeResult:
    """One dashboard mode over the rounds, and its cost against ``off``."""

    mode: str
    steps_per_s_by_round: tuple[float, ...]
    overhead_by_round: tuple[float, ...]
    dashboard_cpu_fraction: float

    @property
    def median_steps_per_s(self) -> float:
        return statistics.median(self.steps_per_s_by_round)

    @property
    def overhead_fraction(self) -> float:
        """Median over rounds of (off steps/s) / (this mode's steps/s) - 1."""
        return statistics.median(self.overhead_by_round)


def run_round(mode: str, args: argparse.Namespace, svg: Path | None) -> RoundResult:
    """Train ``args.warmup + args.steps`` steps under ``mode`` and time them."""
    gen = torch.Generator().manual_seed(1)
    model = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        for _ in range(args.warmup + args.steps)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tty = TTY_FOR_MODE[mode]
    previous = os.environ.pop("TTY_COMPATIBLE", None)
    if tty is not None:
        os.environ["TTY_COMPATIBLE"] = tty
    session_start = time.perf_counter()
    try:
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stderr(sink),
            offload.enable(
                model, optimizer, budgets={"dram": "2GiB"}, dashboard=mode != "off"
            ) as sess,
        ):
            for i, ids in enumerate(batches):
                if i == args.warmup:
                    start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            elapsed_s = time.perf_counter() - start
            if svg is not None and mode == "live":
                write_svg(sess, svg)
    finally:
        os.environ.pop("TTY_COMPATIBLE", None)
        if previous is not None:
            os.environ["TTY_COMPATIBLE"] = previous
    session_s = time.perf_counter() - session_start
    cpu_s = sess._dashboard.cpu_s if sess._dashboard is not None else 0.0
    return RoundResult(args.steps / elapsed_s, cpu_s / session_s)


def write_svg(sess, path: Path) -> None:
    """The panel the dashboard thread would draw now, recorded as SVG."""
    # Let the thread see the last step first, so the rates include it.
    time.sleep(0.5)
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render_dashboard(sess._dashboard.probe.latest()))
    path.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(path), title="offload.enable(..., dashboard=True): tiny Llama on CPU")


def measure(args: argparse.Namespace) -> list[ModeResult]:
    """Every mode ``args.rounds`` times, order rotated per round."""
    by_mode: dict[str, list[RoundResult]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            last = r == args.rounds - 1
            result = run_round(mode, args, args.svg if last else None)
            by_mode[mode].append(result)
            print(
                f"round {r} {mode}: {result.steps_per_s:.3f} steps/s, dashboard CPU "
                f"{result.dashboard_cpu_fraction:.3%} of wall",
                flush=True,
            )
    base = [result.steps_per_s for result in by_mode["off"]]
    return [
        ModeResult(
            mode,
            tuple(result.steps_per_s for result in results),
            tuple(
                off / result.steps_per_s - 1.0 for off, result in zip(base, results, strict=True)
            ),
            statistics.median(result.dashboard_cpu_fraction for result in results),
        )
        for mode, results in by_mode.items()
    ]


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table, write the CSV under experiments/results/<machine>/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--svg", type=Path, default=None, help="write the last live panel here")
    parser.add_argument("--note", default="", help="stored with each row, e.g. 'shared machine'")
    args = parser.parse_args(argv)
    results = measure(args)
    machine = this_machine()
    rows = [
        {
            "source": "measured",
            "machine": machine,
            "mode": r.mode,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "hidden": args.hidden,
            "layers": args.layers,
            "median_steps_per_s": r.median_steps_per_s,
            "min_steps_per_s": min(r.steps_per_s_by_round),
            "max_steps_per_s": max(r.steps_per_s_by_round),
            "steps_per_s_by_round": " ".join(f"{v:.4f}" for v in r.steps_per_s_by_round),
            "overhead_fraction": r.overhead_fraction,
            "overhead_by_round": " ".join(f"{v:+.4f}" for v in r.overhead_by_round),
            "dashboard_cpu_fraction": r.dashboard_cpu_fraction,
            "note": args.note,
        }
        for r in results
    ]
    path = RESULTS_DIR / machine / "dashboard_overhead.csv"
    write_results(rows, path)
    print(
        f"\n{'mode':<10} {'median steps/s':>15} {'min':>8} {'max':>8} {'overhead':>9} "
        f"{'dashboard CPU':>14}"
    )
    for r in results:
        print(
            f"{r.mode:<10} {r.median_steps_per_s:>15.3f} {min(r.steps_per_s_by_round):>8.3f} "
            f"{max(r.steps_per_s_by_round):>8.3f} {r.overhead_fraction:>+9.2%} "
            f"{r.dashboard_cpu_fraction:>14.3%}"
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
