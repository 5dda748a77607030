"""Figure: the step simulator against measured runs of our runtime, per phase and model size, with
the calibration size marked (reads experiments/results/*/validation_measured.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from plots.figure_io import load, save, source_label

TIMED_PHASES = ("forward", "backward", "optimizer")
BARS = (
    ("measured", "", "measured"),
    ("simulated", "fitted", "fitted"),
    ("simulated", "prior", "prior"),
)


def plot() -> plt.Figure:
    """One row of panels per machine, one panel per timed phase: measured and simulated seconds
    per workload, the simulated bars labelled with their error.

    >>> fig = plot()
    >>> len(fig.axes) % len(TIMED_PHASES)
    0
    """
    frame = load("validation_measured.csv").fillna({"rates": "", "role": ""})
    machines = sorted(frame["machine"].unique())
    fig, axes = plt.subplots(
        len(machines), len(TIMED_PHASES), figsize=(13, 4 * len(machines)), squeeze=False
    )
    for row, machine in enumerate(machines):
        mine = frame[(frame["machine"] == machine) & (frame["unit"] == "s")]
        workloads = list(dict.fromkeys(mine.sort_values("n_params")["workload"]))
        calibration = set(mine.loc[mine["role"] == "calibration", "workload"])
        # Other work on the machine shows up as time; say how much there was.
        loads = mine.groupby("workload")["load_1min"].max()
        x = np.arange(len(workloads))
        for ax, phase in zip(axes[row], TIMED_PHASES, strict=True):
            for i, (source, rates, label) in enumerate(BARS):
                part = mine[
                    (mine["phase"] == phase) & (mine["source"] == source) & (mine["rates"] == rates)
                ].set_index("workload")
                if part.empty:
                    continue
                values = [part["value"].get(w, np.nan) for w in workloads]
                bars = ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
                if source == "simulated":
                    errors = [part["error"].get(w, np.nan) for w in workloads]
                    ax.bar_label(bars, [f"{e:+.0%}" for e in errors], fontsize=7)
            ticks = [
                f"{w}{' (calibration)' if w in calibration else ''}\nload {loads.get(w, np.nan):.1f}"
                for w in workloads
            ]
            ax.set_xticks(x, ticks)
            ax.set_title(f"{machine}: {phase}")
            ax.set_ylabel("seconds per step")
            ax.legend(fontsize=8)
    fig.suptitle(f"Simulator vs our runtime's per-step report: {source_label(frame)}")
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_validation"))
