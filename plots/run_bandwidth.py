"""The ``offload report --plot`` figure of transfer bandwidth achieved per step against the ceiling
each run recorded; a CPU run (no DMA) is said so in words. Reads run records only; no measuring.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from offload.tools.run_record import RunRecord, ceiling_source_text
from plots.profile_common import plt, save_png

DIRECTIONS = (("h2d", "H2D", "tab:blue"), ("d2h", "D2H", "tab:orange"))


def plot_bandwidth(runs: Mapping[str, RunRecord], png_path: str | Path) -> Path:
    """Write :func:`bandwidth_figure` of ``runs`` to ``png_path`` and return the path.

    >>> from offload.tools.run_record import SCHEMA, MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("vm", "2", None, None),
    ...                 [{"step": 0, "h2d_gb_per_s": 3.0, "d2h_gb_per_s": 2.0}])
    >>> plot_bandwidth({"a": rec}, "/tmp/run_bandwidth_doctest.png").stat().st_size > 0
    True
    """
    return save_png(bandwidth_figure(runs), png_path)


def bandwidth_figure(runs: Mapping[str, RunRecord]) -> Figure:
    """One panel per run: H2D and D2H GB/s of each step, the recorded ceilings as dashed lines.

    A run without DMA (CPU only: its copies were host memcpy, whose rate is no link's) gets a
    panel that says so and gives the memcpy medians, instead of an empty or misleading chart.

    >>> from offload.tools.run_record import SCHEMA, MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("vm", "2", None, None), [])
    >>> fig = bandwidth_figure({"a": rec}); fig.axes[0].get_title().splitlines()[0]
    'a: no DMA (CPU-only run)'
    >>> plt.close(fig)
    """
    if not runs:
        raise ValueError("bandwidth_figure needs at least one run; give {name: load_run(path)}")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.8 * len(runs), 3.6), squeeze=False)
    for ax, (name, record) in zip(axes[0], runs.items(), strict=True):
        if record.has_dma:
            _draw_dma(ax, name, record)
        else:
            _say_no_dma(ax, name, record)
    fig.suptitle("transfer bandwidth achieved vs ceiling", fontsize=10)
    return fig


def _draw_dma(ax: Axes, name: str, record: RunRecord) -> None:
    frame = record.steps_frame()
    steps = frame["step"] if "step" in frame else range(len(frame))
    ceilings = record.ceilings
    for key, label, colour in DIRECTIONS:
        column = f"{key}_gb_per_s"
        if column in frame:
            ax.plot(steps, frame[column], marker="o", color=colour, label=f"{label} achieved")
        ceiling = getattr(ceilings, column) if ceilings else None
        if ceiling is not None:
            ax.axhline(ceiling, color=colour, linestyle="--", label=f"{label} ceiling")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("GB/s (1e9 bytes)")
    ax.set_title(f"{name}: {record.where}", fontsize=9)
    ax.annotate(
        f"ceiling: {ceiling_source_text(ceilings)}",
        xy=(0.01, 0.01),
        xycoords="axes fraction",
        fontsize=7,
        wrap=True,
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")


def _say_no_dma(ax: Axes, name: str, record: RunRecord) -> None:
    frame = record.steps_frame()
    medians = []
    for key, label, _ in DIRECTIONS:
        column = f"{key}_gb_per_s"
        values = frame[column].dropna() if column in frame else ()
        medians.append(f"{label} {values.median():.2f}" if len(values) else f"{label} -")
    ax.set_axis_off()
    ax.set_title(f"{name}: no DMA (CPU-only run)\n{record.where}", fontsize=9)
    ax.text(
        0.5,
        0.5,
        "no GPU, so no DMA and no link ceiling to compare against.\n"
        "The run's H2D/D2H copies were host memcpy;\n"
        f"median memcpy GB/s: {', '.join(medians)}\n"
        f"ceiling source: {ceiling_source_text(record.ceilings)}",
        ha="center",
        va="center",
        fontsize=8,
        wrap=True,
    )
