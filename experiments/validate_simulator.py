"""Validate the step simulator against real DRAM-only runs: our runtime's per-step report
(``OffloadSession.report()``) on this machine, and the H100 figures of reference/MEASURED.md.

The calibration itself (the fit, the priors, the comparison rows) is
offload.planning.simulator.calibration; this script trains the models, reads reports and writes the
CSVs. It must not change the simulator's constants.

    # the reference figures (no GPU needed): writes experiments/results/h100-reference/validation.csv
    .venv/bin/python experiments/validate_simulator.py
    # measured runs of our runtime here, rates fitted on one size and the others held out:
    # writes experiments/results/<this machine>/validation_measured.csv
    .venv/bin/python experiments/validate_simulator.py --measure cpu-sizes \
        --profile experiments/results/cpu-2core/profile.json
    .venv/bin/python experiments/validate_simulator.py --measure gpu-1.1b   # on a GPU machine
    # a saved report, on the machine's measured rates
    .venv/bin/python experiments/validate_simulator.py --report steps.csv --model llama-1.1b \
        --batch 1 --seq 8192 --profile profile.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.placement import as_placement
from experiments.common.results_io import RESULTS_DIR, this_machine, write_results
from offload.planning.activation_bytes import ACTIVATION_MODES
from offload.planning.model_shapes import MODELS, ModelShape, load_model_shape
from offload.planning.simulator.calibration import (
    CLASSES,
    REFERENCE_MACHINE,
    MeasuredRun,
    Preset,
    Workload,
    best_of_rounds,
    comparison_rows,
    h100_rates,
    measured_from_report,
    prior_rates,
    reference_rows,
    runtime_config,
)
from offload.planning.simulator.rates import GIB, SimRates, load_rates
from offload.planning.simulator.step import StepConfig, simulate_step


def compare_report(
    report: pd.DataFrame, model: str, batch: int, seq: int, rates: SimRates, config: StepConfig
) -> pd.DataFrame:
    """Per phase: the report's mean (first two steps dropped, as in the paper), the simulator's
    prediction for a DRAM-only placement, and the relative error.

    >>> report = pd.DataFrame({"forward_ms": [1e3] * 4, "backward_ms": [1e3] * 4,
    ...                        "optimizer_ms": [1e3] * 4})
    >>> table = compare_report(report, "llama-1.1b", 1, 1024, h100_rates(), runtime_config())
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


# --- Measured runs of our runtime: the simulator against the per-step report, on any machine ---


def _llama(layers: int, hidden: int, vocab: int, heads: int, kv_heads: int) -> ModelShape:
    return ModelShape(
        name=f"llama-h{hidden}-l{layers}",
        layers=layers,
        hidden=hidden,
        intermediate=2 * hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        vocab=vocab,
    )


def _llama_1b_layers(layers: int) -> ModelShape:
    base = MODELS["llama-1.1b"]
    return replace(base, name=f"llama-1.1b-l{layers}", layers=layers)


PRESETS = {
    # Tiny random Llamas on this CPU (about 7M, 23M, 68M params), fp32 as a CPU trains.
    "cpu-sizes": Preset(
        workloads=(
            Workload(_llama(4, 256, 8192, 4, 2), 1, 256),
            Workload(_llama(6, 512, 8192, 4, 2), 1, 256),
            Workload(_llama(8, 768, 16384, 4, 2), 1, 256),
        ),
        calibrate_on="23M",
        device="cpu",
        dtype="float32",
        activations="checkpoint",
        steps=10,
        rounds=2,
        # Five engineers share these 2 cores: other work only ever adds time to a step, so the
        # least disturbed step is the closest to this machine's own speed.
        statistic="min",
    ),
    # The 1.1B Llama of reference/MEASURED.md and two shallower cuts of it, bf16 on one GPU.
    "gpu-1.1b": Preset(
        workloads=tuple(Workload(_llama_1b_layers(n), 1, 4096) for n in (6, 11, 22)),
        calibrate_on="616M",
        device="cuda",
        dtype="bfloat16",
        activations="checkpoint",
        steps=8,
        rounds=2,
        statistic="median",
    ),
}


def _sync_hooks(model: torch.nn.Module, device: torch.device) -> None:
    # The runtime's report times forward with host timestamps; on a GPU that is only the time to
    # queue kernels unless the host waits for them at both ends. Hooks registered before
    # enable() run before the session's own.
    if device.type != "cuda":
        return
    model.register_forward_pre_hook(lambda *_: torch.cuda.synchronize(device))
    model.register_forward_hook(lambda *_: torch.cuda.synchronize(device))


def measure_workload(workload: Workload, preset: Preset, steps: int | None = None) -> MeasuredRun:
    """Train ``workload`` for ``steps`` steps under ``offload.enable`` (DRAM only, optimizer after
    backward) with random weights and tokens, and reduce the session's report.

    >>> small = Workload(_llama(1, 32, 64, 2, 1), 1, 16)
    >>> measure_workload(small, PRESETS["cpu-sizes"], steps=3).phases["d2h"] > 0  # doctest: +SKIP
    True
    """
    import transformers

    import offload

    steps = steps or preset.steps
    device = torch.device(preset.device)
    dtype = getattr(torch, preset.dtype)
    w = workload
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **w.shape.llama_config_kwargs(),
        tie_word_embeddings=w.shape.tied_embeddings,
        max_position_embeddings=max(w.seq, 2048),
    )
    with device:
        model = transformers.LlamaForCausalLM(config).to(dtype).train()
    _sync_hooks(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Masters, two Adam states, gradients and half copies, and the offloaded activations with
    # the loss's log-probs (twice), with room to spare: a budget only caps, it reserves nothing.
    per_param = 4 + 8 + 2 * (4 if preset.dtype == "float32" else 2)
    tokens = w.batch * w.seq
    activations = 4 * tokens * w.shape.hidden * w.shape.layers + 8 * tokens * w.shape.vocab
    budget = per_param * w.shape.n_params + 2 * activations + GIB
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, w.shape.vocab, (w.batch, w.seq), generator=gen).to(device)
        for _ in range(steps)
    ]
    with offload.enable(
        model,
        optimizer,
        activations=preset.activations if preset.activations != "off" else False,
        policy="local_only",
        budgets={"dram": budget},
        overlap_step=False,
    ) as session:
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if device.type == "cuda":
                # The report's backward ends where step() starts; make that the GPU's end too.
                torch.cuda.synchronize(device)
            optimizer.step()
            optimizer.zero_grad()
        report = session.report()
    run = measured_from_report(w, report, statistic=preset.statistic)
    return replace(run, load_1min=os.getloadavg()[0])


def measure_preset(
    name: str,
    profile: str | None,
    machine: str | None = None,
    steps: int | None = None,
    rounds: int | None = None,
) -> pd.DataFrame:
    """Measure every workload of preset ``name``, compare, and write
    ``results/<machine>/validation_measured.csv``; returns the rows written.

    >>> frame = measure_preset("cpu-sizes", "profile.json", rounds=1)  # doctest: +SKIP
    >>> sorted(set(frame["source"]))  # doctest: +SKIP
    ['measured', 'simulated']
    """
    preset = PRESETS[name]
    if rounds is not None:
        preset = replace(preset, rounds=rounds)
    machine = machine or this_machine()
    # The first run in a process pays one-time costs (kernel loading, allocator growth) beyond its
    # warm-up steps; a short unreported run takes them.
    measure_workload(preset.workloads[0], preset, steps=3)
    # Rounds go over every size in turn, so a burst of other work does not land on one size only.
    by_round: dict[str, list[MeasuredRun]] = {w.label: [] for w in preset.workloads}
    for round_index in range(preset.rounds):
        for workload in preset.workloads:
            start = time.perf_counter()
            by_round[workload.label].append(measure_workload(workload, preset, steps))
            elapsed = time.perf_counter() - start
            print(f"round {round_index + 1}: {workload.label} in {elapsed:.1f} s", flush=True)
    runs = [best_of_rounds(by_round[w.label]) for w in preset.workloads]
    prior = prior_rates(preset, profile) if profile or preset.device != "cpu" else None
    rows = comparison_rows(runs, preset, machine, prior)
    return write_results(rows, RESULTS_DIR / machine / "validation_measured.csv")


def error_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per rates variant, phase and role: the largest absolute relative error of the simulated
    rows, and how many rows it is over.

    >>> frame = pd.DataFrame({"source": ["simulated"] * 2, "rates": ["fitted"] * 2,
    ...     "phase": ["optimizer"] * 2, "role": ["held-out"] * 2, "error": [0.1, -0.2]})
    >>> error_summary(frame)["max_abs_error"].tolist()
    [0.2]
    """
    sim = frame[frame["source"] == "simulated"].assign(abs_error=lambda f: f["error"].abs())
    return (
        sim.groupby(["rates", "phase", "role"])["abs_error"]
        .agg(max_abs_error="max", rows="count")
        .reset_index()
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and write) the simulator's error on the reference runs, on measured runs of a
    preset (``--measure``), or on a given report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="a runtime per-step report CSV of a DRAM-only run")
    parser.add_argument("--model", default="llama-1.1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--profile", help="the machine's offload-profile JSON (rates)")
    parser.add_argument("--out", help="with --report: also write the comparison to this CSV")
    parser.add_argument("--dtype", default="bfloat16", help="with --report: the model's dtype")
    parser.add_argument(
        "--activations",
        default="checkpoint",
        choices=ACTIVATION_MODES,
        help="with --report: the run's offload.enable(activations=...); 'saved_tensors' is "
        "simulated from offload.planning.activation_bytes (every saved tensor of a Llama-like layer)",
    )
    parser.add_argument(
        "--overlap-step",
        default="on",
        choices=("on", "off"),
        help="with --report: the run's overlap_step (offload.enable's default: on)",
    )
    parser.add_argument(
        "--loss-chunked",
        action="store_true",
        help="with --report: the run set loss_chunk_tokens (no whole log-probs to offload)",
    )
    parser.add_argument(
        "--rounds", type=int, help="with --measure: rounds over the sizes (default: the preset's)"
    )
    parser.add_argument(
        "--measure",
        choices=sorted(PRESETS),
        help="train the preset's models under offload.enable here and compare phase by phase",
    )
    parser.add_argument("--machine", help="with --measure: results folder (default: this machine)")
    parser.add_argument("--steps", type=int, help="with --measure: steps per model (2 warm-up)")
    args = parser.parse_args(argv)
    if args.measure:
        frame = measure_preset(args.measure, args.profile, args.machine, args.steps, args.rounds)
        print(error_summary(frame).round(3).to_string(index=False))
        return 0
    if args.report:
        rates = h100_rates()
        if args.profile:
            from allocators.sysfs_topology import discover

            rates = load_rates(discover(), args.profile)
        config = runtime_config(
            args.dtype, args.activations, args.overlap_step == "on", args.loss_chunked
        )
        table = compare_report(
            pd.read_csv(args.report), args.model, args.batch, args.seq, rates, config
        )
        print(table.round(3).to_string(index=False))
        if args.out:
            run = {"report": args.report, "model": args.model, "batch": args.batch, "seq": args.seq}
            table.assign(**run).to_csv(args.out, index=False)
            print(f"wrote {args.out}")
        return 0
    frame = write_results(reference_rows(), RESULTS_DIR / REFERENCE_MACHINE / "validation.csv")
    print(frame.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
