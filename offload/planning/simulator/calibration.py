"""Calibration of the step simulator: the rates and the device speed read off one measured run of
our runtime (its per-step report), the prior rates known before any run (a profile, or the H100
figures of reference/MEASURED.md), and the table that checks the fit on runs held out from it.

It fits and compares numbers only; it must not train, time anything, or change the simulator's
constants (DEEPSPEED_OVERHEAD and the MFU are recomputed by :func:`reference_rows` only to show
where they come from). experiments/validate_simulator.py runs the models and writes the CSVs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from allocators.placement import Placement, as_placement
from allocators.topology import NodeRates, NumaNode
from offload.config import OffloadConfig
from offload.planning.model_shapes import MODELS, ModelShape
from offload.planning.runtime_step import runtime_step
from offload.planning.simulator.compute import GpuModel, compute_seconds, fitted_device
from offload.planning.simulator.rates import (
    ADAMW_NBYTES_PER_ELEMENT,
    GIB,
    SimRates,
    host_device_rates,
    memcpy_gib_per_s,
    profile_rates,
    sim_rates,
)
from offload.planning.simulator.step import (
    DEEPSPEED_OVERHEAD_S_PER_PARAM,
    StepConfig,
    phase_traffic,
    simulate_step,
)

if TYPE_CHECKING:
    import pandas as pd

CLASSES = ("params", "activations", "grads", "master_grads", "master_params", "optimizer_state")
# reference/MEASURED.md, the lent H100 machine: pinned copies at 1 GiB (GB/s), torch fused AdamW
# with 16 threads at 64M elements. DeepSpeedCPUAdam was not measured there; we take the same rate.
H100_H2D_GB_PER_S = 55.1
H100_D2H_GB_PER_S = 55.2
H100_ADAMW_ELEMENTS_PER_S = 4.84e9
REFERENCE_MACHINE = "h100-reference"


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
        common = {"machine": REFERENCE_MACHINE, "run": ref.label, "seq": ref.seq, "role": ref.role}
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


# Per phase: what the report calls it, its unit, and which simulator output predicts it.
PHASES = ("forward", "backward", "optimizer", "d2h", "h2d")
UNITS = {"forward": "s", "backward": "s", "optimizer": "s", "d2h": "bytes", "h2d": "bytes"}
# Phases whose prediction comes from memory rates only (what a CPU run can check).
MEMORY_PHASES = ("optimizer",)


@dataclass(frozen=True)
class Workload:
    """One measured run's shape: a Llama-family model at (batch, seq) in ``dtype``."""

    shape: ModelShape
    batch: int
    seq: int

    @property
    def label(self) -> str:
        """The size, as the CSV and the calibration choice name it (``"23M"``, ``"85K"``)."""
        n = self.shape.n_params
        return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


@dataclass(frozen=True)
class Preset:
    """A validation set: the workloads, the one the rates are fitted on, and how to run them."""

    workloads: tuple[Workload, ...]
    calibrate_on: str
    device: str
    dtype: str
    activations: str
    steps: int
    rounds: int
    statistic: str


@dataclass(frozen=True)
class MeasuredRun:
    """The report of one run reduced to its steady state: per phase one value over the steps
    after the warm-up ones (seconds, or bytes per step), the copy rates it achieved, and the
    machine's 1-minute load average when it ended (other work shares a CPU machine)."""

    workload: Workload
    phases: dict[str, float]
    d2h_gib_per_s: float
    h2d_gib_per_s: float
    steps: int
    load_1min: float = float("nan")


def measured_from_report(
    workload: Workload, report: pd.DataFrame, warmup: int = 2, statistic: str = "median"
) -> MeasuredRun:
    """Reduce a ``sess.report()`` frame: drop ``warmup`` steps, then per column the ``statistic``
    (``"median"``, or ``"min"`` on a machine shared with other work) over the steps left, ms as
    seconds; the copy rates take the fastest step under ``"min"``.

    >>> import pandas as pd
    >>> report = pd.DataFrame({"forward_ms": [9.0, 1, 1, 3], "backward_ms": [9.0, 2, 2, 2],
    ...     "optimizer_ms": [9.0, 4, 4, 4], "d2h_nbytes": [8] * 4, "h2d_nbytes": [8] * 4,
    ...     "d2h_gb_per_s": [1.0] * 4, "h2d_gb_per_s": [1.0] * 4})
    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> run = measured_from_report(w, report, warmup=1)
    >>> run.phases["forward"], run.phases["d2h"], run.steps
    (0.001, 8.0, 3)
    """
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic = {statistic!r}; write 'median' or 'min'")
    if len(report) <= warmup:
        raise ValueError(
            f"the report has {len(report)} steps; give more than the {warmup} warm-up steps"
        )
    steady = report.iloc[warmup:]

    def reduce(column: str, fastest: str = "min") -> float:
        values = steady[column]
        if statistic == "median":
            return float(values.median())
        return float(values.min() if fastest == "min" else values.max())

    phases = {p: reduce(f"{p}_ms") / 1e3 for p in ("forward", "backward", "optimizer")}
    for direction in ("d2h", "h2d"):
        if steady[f"{direction}_nbytes"].nunique() > 1:
            raise ValueError(f"{direction}_nbytes differs between steps; the steps are not alike")
        phases[direction] = float(steady[f"{direction}_nbytes"].iloc[0])
    return MeasuredRun(
        workload=workload,
        phases=phases,
        d2h_gib_per_s=reduce("d2h_gb_per_s", "max") * 1e9 / GIB,
        h2d_gib_per_s=reduce("h2d_gb_per_s", "max") * 1e9 / GIB,
        steps=len(steady),
    )


def best_of_rounds(runs: Sequence[MeasuredRun]) -> MeasuredRun:
    """One workload measured in several rounds: per timed phase the fastest round's value, and
    the fastest copy rates. Other work on a shared machine only ever adds time, so the least
    disturbed round is the closest to the machine's own speed; bytes must agree in every round.

    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> a = MeasuredRun(w, {"forward": 2.0, "d2h": 8.0}, 1.0, 3.0, 4)
    >>> b = MeasuredRun(w, {"forward": 1.0, "d2h": 8.0}, 2.0, 2.0, 4)
    >>> best = best_of_rounds([a, b])
    >>> best.phases, best.d2h_gib_per_s, best.h2d_gib_per_s, best.steps
    ({'forward': 1.0, 'd2h': 8.0}, 2.0, 3.0, 8)
    """
    phases = {}
    for phase in runs[0].phases:
        values = [run.phases[phase] for run in runs]
        if UNITS[phase] == "bytes" and len(set(values)) > 1:
            raise ValueError(f"{phase} bytes differ between rounds ({values}); the runs differ")
        phases[phase] = min(values)
    return MeasuredRun(
        workload=runs[0].workload,
        phases=phases,
        d2h_gib_per_s=max(run.d2h_gib_per_s for run in runs),
        h2d_gib_per_s=max(run.h2d_gib_per_s for run in runs),
        steps=sum(run.steps for run in runs),
        load_1min=max(run.load_1min for run in runs),
    )


def runtime_config(
    dtype: str = "bfloat16",
    activations: str = "checkpoint",
    overlap_step: bool = True,
    chunked_loss: bool = False,
    gpu: GpuModel | None = None,
) -> StepConfig:
    """The simulator's settings for a run of ``offload.enable`` with these settings (others at
    enable()'s defaults), as offload.planning.runtime_step defines them for every caller.

    >>> runtime_config("float32").param_nbytes, runtime_config().overlap_step
    (4, True)
    >>> from offload.planning.runtime_step import OUR_RUNTIME
    >>> runtime_config() == OUR_RUNTIME
    True
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype = {dtype!r}; write 'float32', 'bfloat16' or 'float16'")
    settings = OffloadConfig(
        activations=activations,
        overlap_step=overlap_step,
        # Any chunk size: the simulator only needs to know the log-probs never exist whole.
        loss_chunk_tokens=1024 if chunked_loss else None,
    )
    return runtime_step(settings, param_nbytes=4 if dtype == "float32" else 2, gpu=gpu)


def step_config(preset: Preset, gpu: GpuModel | None = None) -> StepConfig:
    """:func:`runtime_config` for how a preset's runs train: the optimizer after backward
    (``overlap_step=False``), so the report's optimizer phase is the whole step.

    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> cpu = Preset((w,), w.label, "cpu", "float32", "checkpoint", 10, 2, "min")
    >>> step_config(cpu).param_nbytes
    4
    """
    return runtime_config(preset.dtype, preset.activations, overlap_step=False, gpu=gpu)


def _placements(node: int) -> dict[str, Placement]:
    return {cls: as_placement(node) for cls in CLASSES}


def predict(
    workload: Workload, rates: SimRates, config: StepConfig, node: int = 0
) -> tuple[dict[str, float], dict[str, str]]:
    """The simulator's value for each of PHASES (seconds, or bytes per step) with everything on
    ``node``, and what bounds each timed phase.

    >>> # fp32 gradients; log-probs once; layer inputs
    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> config = step_config(Preset((w,), w.label, "cpu", "float32", "checkpoint", 10, 2, "min"))
    >>> pred, _ = predict(w, host_device_rates(8.0, 15.0), config)
    >>> pred["d2h"] == 4 * w.shape.n_params + 4 * w.seq * w.shape.vocab  # (inputs < 1 MiB)
    True
    """
    w = workload
    step = simulate_step(w.shape, w.batch, w.seq, _placements(node), rates, config)
    traffic = phase_traffic(w.shape, w.batch, w.seq, _placements(node), config)
    values = {
        "forward": step.forward_s,
        "backward": step.backward_s,
        "optimizer": step.step_s + step.overhead_s,
        "d2h": sum(sum(t.d2h.values()) for t in traffic.values()),
        "h2d": sum(sum(t.h2d.values()) for t in traffic.values()),
    }
    bounds = {p: step.bottlenecks[p] for p in ("forward", "backward")}
    bounds["optimizer"] = step.bottlenecks["step"]
    return values, bounds


def fitted_rates(
    calibration: MeasuredRun, preset: Preset, node: int = 0
) -> tuple[SimRates, GpuModel]:
    """Rates read off the calibration run only: the device's FLOP/s from its forward, the copy
    rates it achieved, and the node's CPU optimizer rate from its optimizer phase less the
    copy-back the simulator charges there. Every other run is then predicted, not fitted.

    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> run = MeasuredRun(w, {"forward": 0.05, "optimizer": 0.02}, 8.0, 8.0, 4)
    >>> cpu = Preset((w,), w.label, "cpu", "float32", "checkpoint", 10, 2, "min")
    >>> rates, device = fitted_rates(run, cpu)
    >>> round(rates.nodes[0].cpu_gib_per_s, 1), rates.cpu_device
    (10.1, True)
    """
    w, config = calibration.workload, step_config(preset)
    cpu = preset.device == "cpu"
    device = fitted_device(
        w.shape,
        w.batch,
        w.seq,
        calibration.phases["forward"],
        name=f"{preset.device} fitted on {w.label}",
        peak_flops_per_s=None if cpu else GpuModel().peak_flops_per_s,
    )
    if not (calibration.h2d_gib_per_s > 0 and calibration.d2h_gib_per_s > 0):
        raise ValueError(
            f"the calibration run {w.label} reports no copy rate (h2d {calibration.h2d_gib_per_s},"
            f" d2h {calibration.d2h_gib_per_s} GiB/s); calibrate on a run that offloads"
        )
    traffic = phase_traffic(w.shape, w.batch, w.seq, _placements(node), config)
    copy_s = sum(traffic["step_dma"].h2d.values()) / (calibration.h2d_gib_per_s * GIB)
    cpu_s = calibration.phases["optimizer"] - copy_s
    if not cpu_s > 0:
        raise ValueError(
            f"the calibration run's optimizer phase ({calibration.phases['optimizer']:.4f} s) is "
            f"no longer than its copy-back ({copy_s:.4f} s); calibrate on a larger model"
        )
    cpu_gib_per_s = sum(traffic["step_cpu"].cpu.values()) / cpu_s / GIB
    if cpu:
        return host_device_rates(calibration.h2d_gib_per_s, cpu_gib_per_s, node), device
    measured = NodeRates(
        h2d_gib_per_s=calibration.h2d_gib_per_s, d2h_gib_per_s=calibration.d2h_gib_per_s
    )
    node_info = NumaNode(node, "dram", (), 0, 0, rates=measured)
    return sim_rates(
        (node_info,), adamw_elements_per_s={node: cpu_gib_per_s * GIB / ADAMW_NBYTES_PER_ELEMENT}
    ), device


def prior_rates(preset: Preset, profile_path: str | None, node: int = 0) -> tuple[SimRates, str]:
    """Rates known before any of these runs, and where they came from: on a CPU device, the
    profile's stream read/write rates (a memcpy) and its CPU AdamW rate; on a GPU, the profile's
    rates, or without one the H100 figures of reference/MEASURED.md.

    >>> w = Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256)
    >>> gpu = Preset((w,), w.label, "cuda", "bfloat16", "checkpoint", 8, 2, "median")
    >>> rates, source = prior_rates(gpu, None)
    >>> rates.cpu_device, source
    (False, 'reference/MEASURED.md H100 rates')
    """
    if profile_path is None:
        if preset.device == "cpu":
            raise ValueError(
                "a CPU device has no prior rates without a profile; pass --profile "
                "experiments/results/cpu-2core/profile.json (from offload-profile)"
            )
        return h100_rates(), "reference/MEASURED.md H100 rates"
    from profilers.machine_profile import load_profile

    profile = load_profile(profile_path)
    source = f"profile {Path(profile_path).name} ({profile.created_utc})"
    if preset.device != "cpu":
        from allocators.sysfs_topology import discover

        return profile_rates(discover(), profile), source
    measured = profile.nodes.get(node)
    fields = ("read_gib_per_s", "write_gib_per_s", "adamw_elements_per_s")
    if measured is None or any(getattr(measured, f) is None for f in fields):
        raise ValueError(
            f"{profile_path} lacks node {node}'s {', '.join(fields)}; run "
            "`offload-profile all` on this machine to measure them"
        )
    copy = memcpy_gib_per_s(measured.read_gib_per_s, measured.write_gib_per_s)
    cpu = measured.adamw_elements_per_s * ADAMW_NBYTES_PER_ELEMENT / GIB
    return host_device_rates(copy, cpu, node), source


def _rates_text(rates: SimRates) -> str:
    return "; ".join(
        f"node {n}: optimizer {r.cpu_gib_per_s:.2f} GiB/s, h2d {r.h2d_gib_per_s:.2f} GiB/s, "
        f"d2h {r.d2h_gib_per_s:.2f} GiB/s"
        for n, r in sorted(rates.nodes.items())
    )


def comparison_rows(
    runs: Sequence[MeasuredRun],
    preset: Preset,
    machine: str,
    prior: tuple[SimRates, str] | None = None,
) -> list[dict]:
    """Rows of predicted vs measured per workload and phase, with the relative error.

    ``rates`` says what a simulated row used: ``fitted`` (on ``preset.calibrate_on``; that
    workload's rows have role ``calibration``, all others ``held-out``) or ``prior`` (rates known
    before the runs, so every row is held out). The prior rows are given for the memory phases,
    and on a GPU also for forward and backward (its compute model is the H100 MFU of
    reference/MEASURED.md); a CPU has no prior FLOP/s.

    >>> w = (Workload(ModelShape("llama-h256-l4", 4, 256, 512, 4, 2, 64, 8192), 1, 256),
    ...      Workload(ModelShape("llama-h512-l6", 6, 512, 1024, 4, 2, 128, 8192), 1, 256))
    >>> cpu = Preset(w, "23M", "cpu", "float32", "checkpoint", 10, 2, "min")
    >>> runs = [MeasuredRun(x, {"forward": x.shape.n_params * 1e-9, "backward": 0.1,
    ...     "optimizer": x.shape.n_params * 4e-9, "d2h": 4.0 * x.shape.n_params,
    ...     "h2d": 4.0 * x.shape.n_params}, 8.0, 8.0, 4) for x in w]
    >>> rows = comparison_rows(runs, cpu, "test")
    >>> sorted({(r["workload"], r["role"]) for r in rows if r["source"] == "simulated"})[0]
    ('23M', 'calibration')
    """
    by_label = {run.workload.label: run for run in runs}
    if len(by_label) < len(runs):
        raise ValueError(
            f"workloads {[r.workload.label for r in runs]} share a size label; give each "
            "workload a different parameter count"
        )
    if preset.calibrate_on not in by_label:
        raise ValueError(
            f"calibrate_on = {preset.calibrate_on!r} is not a measured workload; "
            f"write one of {sorted(by_label)}"
        )
    node_rates, device = fitted_rates(by_label[preset.calibrate_on], preset)
    source = f"fitted on {preset.calibrate_on}; {device.effective_flops_per_s / 1e9:.0f} GFLOP/s"
    variants = [(node_rates, step_config(preset, device), "fitted", source)]
    if prior is not None:
        variants.append((prior[0], step_config(preset), "prior", prior[1]))
    variants = [(r, c, k, f"{s}; {_rates_text(r)}") for r, c, k, s in variants]
    rows = []
    for run in runs:
        w = run.workload
        common = {
            "machine": machine,
            "device": preset.device,
            "workload": w.label,
            "model": w.shape.name,
            "n_params": w.shape.n_params,
            "batch": w.batch,
            "seq": w.seq,
            "dtype": preset.dtype,
            "activations": preset.activations,
            "steps": run.steps,
            "statistic": preset.statistic,
            "load_1min": run.load_1min,
        }
        for phase in PHASES:
            rows.append(
                {
                    "source": "measured",
                    **common,
                    "phase": phase,
                    "unit": UNITS[phase],
                    "value": run.phases[phase],
                    "rates": "",
                    "rate_source": "",
                    "role": "",
                    "bottleneck": "",
                    "error": float("nan"),
                }
            )
        for rates, config, kind, rate_source in variants:
            values, bounds = predict(w, rates, config)
            calibration = kind == "fitted" and w.label == preset.calibrate_on
            for phase in PHASES:
                if kind == "prior" and phase in ("forward", "backward") and preset.device == "cpu":
                    continue
                rows.append(
                    {
                        "source": "simulated",
                        **common,
                        "phase": phase,
                        "unit": UNITS[phase],
                        "value": values[phase],
                        "rates": kind,
                        "rate_source": rate_source,
                        "role": "calibration" if calibration else "held-out",
                        "bottleneck": bounds.get(phase, ""),
                        "error": values[phase] / run.phases[phase] - 1,
                    }
                )
    return rows
