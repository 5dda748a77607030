"""Figure: striping over 1 vs 2 CXL cards, with and without local DRAM: DMA each way and the CPU
AdamW rate (reads experiments/results/*/striping.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from plots.figure_io import load, save, source_label


def plot() -> plt.Figure:
    """Bars of H2D and D2H GiB/s (left) and AdamW G elements/s (right) per stripe.

    >>> len(plot().axes)
    2
    """
    frame = load("striping.csv")
    fig, (dma, cpu) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(frame))
    dma.bar(x - 0.2, frame["h2d_gib_per_s"], 0.4, label="H2D")
    dma.bar(x + 0.2, frame["d2h_gib_per_s"], 0.4, label="D2H")
    dma.set_xticks(x, frame["stripe"], rotation=15)
    dma.set_ylabel("GiB/s, 2 GiB copy, one GPU")
    dma.legend()
    cpu.bar(x, frame["adamw_g_elements_per_s"], 0.5, color="tab:green")
    cpu.set_xticks(x, frame["stripe"], rotation=15)
    cpu.set_ylabel("CPU AdamW, G elements/s")
    fig.suptitle(f"Striping over CXL cards: {source_label(frame)}")
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_striping"))
