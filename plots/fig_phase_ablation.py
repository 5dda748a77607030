"""Figure: phase times when one host group at a time moves from local DRAM to CXL (reads
experiments/results/*/phase_ablation.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from plots.figure_io import load, save, source_label

POINTS = ((1, 4096), (3, 32768))


def plot(model: str = "qwen2.5-7b") -> plt.Figure:
    """Stacked forward/backward/step seconds per moved group, one panel per (point, cards).

    >>> len(plot().axes)
    4
    """
    frame = load("phase_ablation.csv")
    frame = frame[frame["model"] == model]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for row, (batch, seq) in enumerate(POINTS):
        for col, cards in enumerate((1, 2)):
            ax = axes[row][col]
            panel = frame[
                (frame["batch"] == batch) & (frame["seq"] == seq) & (frame["cards"] == cards)
            ]
            x = np.arange(len(panel))
            bottom = np.zeros(len(panel))
            for phase in ("forward_s", "backward_s", "step_s"):
                ax.bar(x, panel[phase], bottom=bottom, label=phase.removesuffix("_s"))
                bottom += panel[phase].to_numpy()
            ax.set_xticks(x, panel["moved"], rotation=15, fontsize=8)
            ax.set_ylabel("seconds (without framework overhead)")
            ax.set_title(f"b{batch} s{seq // 1024}K, {cards} card{'s' if cards > 1 else ''}")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model}: one group moved to CXL; {source_label(frame)}")
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_phase_ablation"))
