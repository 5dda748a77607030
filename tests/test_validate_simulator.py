"""The measured-run validation: a tiny model trained under offload.enable gives a row for every
phase with finite measured and simulated values, and the rates are fitted on the calibration
workload only, whose rows are never reported as held out."""

import math
from dataclasses import replace

import pandas as pd
import pytest

from experiments import validate_simulator as vs
from experiments.common.results_io import RESULTS_DIR
from offload.planning.model_shapes import ModelShape
from offload.planning.simulator import calibration as cal

PROFILE = str(RESULTS_DIR / "cpu-2core" / "profile.json")


def _shape(layers: int, hidden: int) -> ModelShape:
    return ModelShape(f"t{layers}x{hidden}", layers, hidden, 2 * hidden, 2, 1, hidden // 2, 256)


WORKLOADS = (cal.Workload(_shape(1, 64), 1, 32), cal.Workload(_shape(2, 96), 1, 32))
PRESET = replace(
    vs.PRESETS["cpu-sizes"],
    workloads=WORKLOADS,
    calibrate_on=WORKLOADS[1].label,
    steps=3,
    rounds=1,
)


@pytest.fixture(scope="module")
def measured():
    return [vs.measure_workload(w, PRESET) for w in WORKLOADS]


@pytest.fixture(scope="module")
def rows(measured):
    return cal.comparison_rows(measured, PRESET, "test", cal.prior_rates(PRESET, PROFILE))


def test_every_phase_has_finite_measured_and_simulated_values(rows):
    for workload in WORKLOADS:
        mine = [r for r in rows if r["workload"] == workload.label]
        for phase in cal.PHASES:
            measured = [r for r in mine if r["phase"] == phase and r["source"] == "measured"]
            fitted = [r for r in mine if r["phase"] == phase and r["rates"] == "fitted"]
            assert len(measured) == 1 and len(fitted) == 1
            assert math.isfinite(measured[0]["value"]) and measured[0]["value"] > 0
            assert math.isfinite(fitted[0]["value"]) and math.isfinite(fitted[0]["error"])
    assert {r["source"] for r in rows} == {"measured", "simulated"}
    assert all(r["rates"] == "" for r in rows if r["source"] == "measured")
    assert all(r["rates"] in ("fitted", "prior") for r in rows if r["source"] == "simulated")


def test_the_bytes_the_step_moves_are_predicted_exactly(rows):
    for row in rows:
        if row["source"] == "simulated" and row["unit"] == "bytes":
            assert row["error"] == pytest.approx(0.0, abs=1e-9), row


def test_a_cpu_has_no_prior_compute_rate_so_no_prior_forward_rows(rows):
    prior = {r["phase"] for r in rows if r["rates"] == "prior"}
    assert prior == {"optimizer", "d2h", "h2d"}


def test_the_calibration_workload_is_never_reported_as_held_out(rows):
    calibration = PRESET.calibrate_on
    for row in rows:
        if row["rates"] == "fitted":
            assert (row["role"] == "calibration") == (row["workload"] == calibration), row
        if row["rates"] == "prior":
            assert row["role"] == "held-out"  # nothing was fitted to any run
    summary = vs.error_summary(pd.DataFrame(rows))
    held_out_fitted = summary[(summary["rates"] == "fitted") & (summary["role"] == "held-out")]
    assert set(held_out_fitted["rows"]) == {1}  # one held-out workload per phase


def test_the_fit_reproduces_the_calibration_run_and_nothing_else(measured, rows):
    def fitted(table):
        return {(r["workload"], r["phase"]): r["value"] for r in table if r["rates"] == "fitted"}

    errors = {(r["workload"], r["phase"]): r["error"] for r in rows if r["rates"] == "fitted"}
    for phase in ("forward", "optimizer"):
        assert errors[(PRESET.calibrate_on, phase)] == pytest.approx(0.0, abs=1e-9)
    # What a held-out run measured must not change what is predicted for it.
    held_out = measured[0]
    doubled = replace(held_out, phases={k: 2 * v for k, v in held_out.phases.items()})
    again = cal.comparison_rows([doubled, measured[1]], PRESET, "test")
    assert fitted(again) == pytest.approx(fitted(rows))


def test_an_unknown_calibration_workload_is_named():
    run = cal.MeasuredRun(WORKLOADS[0], dict.fromkeys(cal.PHASES, 1.0), 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="calibrate_on"):
        cal.comparison_rows([run], replace(PRESET, calibrate_on="nope"), "test")


def test_a_cpu_run_without_a_profile_has_no_prior_and_says_what_to_pass():
    with pytest.raises(ValueError, match="--profile"):
        cal.prior_rates(PRESET, None)


def test_the_gpu_preset_compares_with_h100_priors_for_every_phase():
    # No GPU here: the GPU preset's comparison on made-up measurements (its runs need CUDA).
    preset = vs.PRESETS["gpu-1.1b"]
    runs = [
        cal.MeasuredRun(w, {**dict.fromkeys(cal.PHASES, 1.0), "d2h": 1e9, "h2d": 1e9}, 20, 20, 6)
        for w in preset.workloads
    ]
    rows = cal.comparison_rows(runs, preset, "gpu-test", cal.prior_rates(preset, None))
    prior = {(r["workload"], r["phase"]) for r in rows if r["rates"] == "prior"}
    assert prior == {(w.label, p) for w in preset.workloads for p in cal.PHASES}
    assert {
        r["role"] for r in rows if r["workload"] == preset.calibrate_on and r["rates"] == "fitted"
    } == {"calibration"}
    assert all(math.isfinite(r["value"]) for r in rows)


@pytest.mark.parametrize("name", sorted(vs.PRESETS))
def test_each_preset_calibrates_on_one_of_its_workloads_and_holds_out_the_rest(name):
    preset = vs.PRESETS[name]
    labels = [w.label for w in preset.workloads]
    assert labels.count(preset.calibrate_on) == 1 and len(set(labels)) >= 3
