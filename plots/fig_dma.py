"""Figure: host<->GPU DMA rate by copy size and host placement, each direction, 1 and 2 GPUs
(reads experiments/results/*/dma_sweep.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from plots.figure_io import load, save, source_label


def plot() -> plt.Figure:
    """GiB/s against copy size, one panel per (direction, GPUs), one line per mix and source.

    >>> plot().axes[0].get_xscale()
    'log'
    """
    frame = load("dma_sweep.csv")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey=True)
    for ax, (direction, gpus) in zip(
        axes.flat, [("h2d", 1), ("d2h", 1), ("h2d", 2), ("d2h", 2)], strict=True
    ):
        panel = frame[(frame["direction"] == direction) & (frame["gpus"] == gpus)]
        for (source, mix), rows in panel.groupby(["source", "mix"]):
            style = "-" if source == "simulated" else "o"
            ax.plot(rows["nbytes"], rows["gib_per_s"], style, label=f"{mix} ({source})")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{direction.upper()}, {gpus} GPU{'s' if gpus > 1 else ''} (per GPU)")
        ax.set_xlabel("copy size (bytes)")
        ax.set_ylabel("GiB/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DMA by size and placement: {source_label(frame)}")
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_dma"))
