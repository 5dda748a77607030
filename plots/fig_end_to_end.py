"""Figure: fine-tuning throughput relative to local_only, by strategy, for each model, number of
CXL cards and (micro-batch, sequence) point (reads experiments/results/*/end_to_end.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from plots.figure_io import load, save, source_label

# What each runtime of the CSV streams and keeps where (experiments/exp_end_to_end.py).
RUNTIME_LABELS = {
    "deepspeed-zero3": "DeepSpeed ZeRO-3 runtime, params streamed from the host",
    "ours": "our runtime (offload.enable), params on the GPU",
}


# The budgets of the CSV's CXL runs (experiments/exp_end_to_end.py).
BUDGET_LABELS = {
    "paper": "local DRAM 18P + half the checkpoints",
    "14P": "local DRAM 14P (the optimizer's 16P does not fit)",
}


def plot(runtime: str = "deepspeed-zero3", budget: str = "paper") -> plt.Figure:
    """Grouped bars of tokens/s / local_only, one panel per (model, cards), for one budget case.

    >>> len(plot().axes), len(plot(budget="14P").axes)
    (4, 4)
    """
    frame = load("end_to_end.csv")
    frame = frame[
        (frame["runtime"] == runtime)
        & (frame["source"] == "simulated")
        & (frame["budget"] == budget)
    ]
    strategies = list(dict.fromkeys(frame["strategy"]))
    panels = list(dict.fromkeys(zip(frame["model"], frame["cards"], strict=True)))
    # Every bar in view: our runtime's ratios reach further from 1 than the paper's.
    low = min(0.7, frame["vs_local_only"].min() - 0.05)
    high = max(1.1, frame["vs_local_only"].max() + 0.05)
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(13, 7), sharey=True)
    for ax, (model, cards) in zip(axes.flat, panels, strict=True):
        panel = frame[(frame["model"] == model) & (frame["cards"] == cards)]
        points = list(dict.fromkeys(zip(panel["batch"], panel["seq"], strict=True)))
        x = np.arange(len(points))
        width = 0.8 / len(strategies)
        for i, strategy in enumerate(strategies):
            rows = panel[panel["strategy"] == strategy]
            ax.bar(x + i * width, rows["vs_local_only"], width, label=strategy)
        ax.set_xticks(x + 0.4 - width / 2, [f"b{b} s{s // 1024}K" for b, s in points])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(low, high)
        ax.set_title(f"{model}, {cards} CXL card{'s' if cards > 1 else ''}")
        ax.set_ylabel("tokens/s vs local_only")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"End-to-end, {RUNTIME_LABELS.get(runtime, runtime)}, "
        f"{BUDGET_LABELS.get(budget, budget)}\n{source_label(frame)}"
    )
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_end_to_end"))
    print(save(plot("ours"), "fig_end_to_end_ours"))
    print(save(plot(budget="14P"), "fig_end_to_end_14p"))
