"""Figure: CPU AdamW step time by tensor size and placement, simulated against the paper's table and
against our measured runs (reads experiments/results/*/cpu_optimizer.csv only)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from plots.figure_io import load, save, source_label


def plot() -> plt.Figure:
    """Milliseconds against elements (log-log): lines simulated, crosses the paper, dots measured.

    >>> len(plot().axes)
    1
    """
    frame = load("cpu_optimizer.csv")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (source, machine, placement), rows in frame.groupby(["source", "machine", "placement"]):
        style = "-" if source == "simulated" else "o"
        ax.plot(rows["elements"], rows["ms"], style, label=f"{placement}: {source} ({machine})")
    paper = frame.dropna(subset=["paper_ms"]).drop_duplicates(["elements", "placement"])
    for placement, rows in paper.groupby("placement"):
        ax.plot(rows["elements"], rows["paper_ms"], "x", ms=9, label=f"{placement}: paper [bench]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements per tensor")
    ax.set_ylabel("ms per AdamW step")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"CPU AdamW by size and placement\n{source_label(frame)}", fontsize=9)
    return fig


if __name__ == "__main__":
    print(save(plot(), "fig_cpu_optimizer"))
