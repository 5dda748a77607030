"""Validate the step simulator against real DRAM-only runs: a runtime per-step report (the CSV of
``OffloadSession.report()``) from the GPU machine, and the H100 figures of reference/MEASURED.md.

It compares and prints errors; it must not change the simulator's constants (DEEPSPEED_OVERHEAD
and the MFU are recomputed here only to show where they come from).

    # the reference figures (no GPU needed): writes experiments/results/h100-reference/validation.csv
    .venv/bin/python experiments/validate_simulator.py
    # a real run's report, on the machine's measured rates
    .venv/bin/python experiments/validate_simulator.py --report steps.csv --model llama-1.1b \
        --batch 1 --seq 8192 --profile profile.json
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from allocators.placement import as_placement
from allocators.topology import NodeRates, NumaNode
from experiments.results_io import RESULTS_DIR, write_results
from offload.model_shapes import MODELS, load_model_shape
from offload.simulate import (
    DEEPSPEED_OVERHEAD_S_PER_PARAM,
    OUR_RUNTIME,
    StepConfig,
    simulate_step,
)
from offload.simulator_compute import GpuModel, compute_seconds
from offload.simulator_rates import GIB, SimRates, profile_rates, sim_rates

CLASSES = ("params", "activations", "grads", "master_grads", "master_params", "optimizer_state")
# reference/MEASURED.md, the lent H100 machine: pinned copies at 1 GiB (GB/s), torch fused AdamW
# with 16 threads at 64M elements. DeepSpeedCPUAdam was not measured there; we take the same rate.
H100_H2D_GB_PER_S = 55.1
H100_D2H_GB_PER_S = 55.2
H100_ADAMW_ELEMENTS_PER_S = 4.84e9
MACHINE = "h100-reference"


def h100_rates() -> SimRates:
    """The lent H100 machine (one DRAM node) from reference/MEASURED.md.

    >>> round(h100_rates().link_gib_per_s, 1)
    51.4
    """
    node = NumaNode(
        0,
        "dram",
        tuple(range(16)),
        125 * GIB,
        125 * GIB,
        rates=NodeRates(
            h2d_gib_per_s=H100_H2D_GB_PER_S * 1e9 / GIB,
            d2h_gib_per_s=H100_D2H_GB_PER_S * 1e9 / GIB,
        ),
    )
    return sim_rates((node,), adamw_elements_per_s={0: H100_ADAMW_ELEMENTS_PER_S})


@dataclass(frozen=True)
class Reference:
    """One measured DRAM-only run of reference/MEASURED.md and what it was used for."""

    label: str
    seq: int
    tokens_per_s: float
    config: StepConfig | None  # None: everything on the GPU (no offload)
    recompute: bool
    role: str


ZERO2 = StepConfig(
    offload_params=False,
    offload_activations=False,
    overhead_s_per_param=DEEPSPEED_OVERHEAD_S_PER_PARAM,
)
REFERENCES = (
    Reference("all on GPU, no checkpointing", 8192, 39_100, None, False, "calibrates MFU"),
    Reference("all on GPU, checkpointing", 8192, 31_100, None, True, "calibrates MFU"),
    Reference("all on GPU, checkpointing", 32768, 19_000, None, True, "calibrates MFU"),
    Reference(
        "DeepSpeed ZeRO-2, optimizer on CPU", 8192, 9_400, ZERO2, True, "calibrates overhead"
    ),
    Reference("DeepSpeed ZeRO-2, optimizer on CPU", 32768, 14_200, ZERO2, True, "validates"),
)


def _simulated_s(ref: Reference, rates: SimRates) -> float:
    shape = MODELS["llama-1.1b"]
    if ref.config is None:
        forward, backward = compute_seconds(shape, 1, ref.seq, GpuModel(), ref.recompute)
        return forward + backward
    placements = {cls: as_placement(0) for cls in CLASSES}
    return simulate_step(shape, 1, ref.seq, placements, rates, ref.config).total_s


def reference_rows() -> list[dict]:
    """Measured and simulated step time for each reference run, and the relative error.

    >>> rows = reference_rows()
    >>> max(abs(r["error"]) for r in rows if r["role"] == "validates") < 0.10
    True
    """
    rates = h100_rates()
    rows = []
    for ref in REFERENCES:
        measured_s = ref.seq / ref.tokens_per_s
        simulated_s = _simulated_s(ref, rates)
        common = {"machine": MACHINE, "run": ref.label, "seq": ref.seq, "role": ref.role}
        rows.append({"source": "measured", **common, "step_s": measured_s, "error": 0.0})
        rows.append(
            {
                "source": "simulated",
                **common,
                "step_s": simulated_s,
                "error": simulated_s / measured_s - 1,
            }
        )
    return rows


def compare_report(
    report: pd.DataFrame, model: str, batch: int, seq: int, rates: SimRates, config: StepConfig
) -> pd.DataFrame:
    """Per phase: the report's mean (first two steps dropped, as in the paper), the simulator's
    prediction for a DRAM-only placement, and the relative error.

    >>> report = pd.DataFrame({"forward_ms": [1e3] * 4, "backward_ms": [1e3] * 4,
    ...                        "optimizer_ms": [1e3] * 4})
    >>> table = compare_report(report, "llama-1.1b", 1, 1024, h100_rates(), OUR_RUNTIME)
    >>> list(table["phase"])
    ['forward', 'backward', 'step', 'total']
    """
    steady = report.iloc[2:] if len(report) > 2 else report
    measured = {
        "forward": steady["forward_ms"].mean() / 1e3,
        "backward": steady["backward_ms"].mean() / 1e3,
        "step": steady["optimizer_ms"].mean() / 1e3,
    }
    measured["total"] = sum(measured.values())
    placements = {cls: as_placement(0) for cls in CLASSES}
    pred = simulate_step(load_model_shape(model), batch, seq, placements, rates, config)
    simulated = {
        "forward": pred.forward_s,
        "backward": pred.backward_s,
        "step": pred.step_s + pred.overhead_s,
        "total": pred.total_s,
    }
    return pd.DataFrame(
        {
            "phase": list(measured),
            "measured_s": list(measured.values()),
            "simulated_s": [simulated[p] for p in measured],
            "error": [simulated[p] / measured[p] - 1 for p in measured],
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and write) the simulator's error on the reference runs, or on a given report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="a runtime per-step report CSV of a DRAM-only run")
    parser.add_argument("--model", default="llama-1.1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--profile", help="the machine's offload-profile JSON (rates)")
    parser.add_argument("--out", help="with --report: also write the comparison to this CSV")
    args = parser.parse_args(argv)
    if args.report:
        rates = h100_rates()
        if args.profile:
            from allocators.sysfs_topology import discover
            from profilers.machine_profile import load_profile

            rates = profile_rates(discover(), load_profile(args.profile))
        table = compare_report(
            pd.read_csv(args.report), args.model, args.batch, args.seq, rates, OUR_RUNTIME
        )
        print(table.round(3).to_string(index=False))
        if args.out:
            run = {"report": args.report, "model": args.model, "batch": args.batch, "seq": args.seq}
            table.assign(**run).to_csv(args.out, index=False)
            print(f"wrote {args.out}")
        return 0
    frame = write_results(reference_rows(), RESULTS_DIR / MACHINE / "validation.csv")
    print(frame.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
