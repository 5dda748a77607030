"""Figures of saved runs for ``offload report --plot``: each step's phases as stacked bars per run,
and host bytes per tier over steps, titled with where they were measured. Reads records only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from allocators.policies import TIER_NAMES
from offload.tools.run_record import PHASES, RunRecord
from plots.profile_common import plt, save_png


def measured_where(runs: Mapping[str, RunRecord]) -> str:
    """One subtitle naming where each distinct run was measured (records are always measured).

    >>> from offload.tools.run_record import SCHEMA, MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("vm", "2", None, None), [])
    >>> measured_where({"a": rec, "b": rec})
    'measured on vm (CPU only, no GPU)'
    """
    return "; ".join(dict.fromkeys(record.where for record in runs.values()))


def plot_step_breakdown(runs: Mapping[str, RunRecord], png_path: str | Path) -> Path:
    """One panel per run: forward / backward / optimizer ms of each step stacked, and the host's
    wait on copies as a hatched bar from zero: it was spent inside those phases, not after them.

    >>> from offload.tools.run_record import SCHEMA, MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("h", "2", None, None),
    ...                 [{"step": 0, "forward_ms": 2.0, "backward_ms": 3.0, "wait_ms": 1.0}])
    >>> plot_step_breakdown({"a": rec}, "/tmp/run_steps_doctest.png").stat().st_size > 0
    True
    """
    fig, axes = plt.subplots(
        1, len(runs), figsize=(4.5 * len(runs), 3.5), squeeze=False, sharey=True
    )
    for ax, (name, record) in zip(axes[0], runs.items(), strict=True):
        frame = record.steps_frame()
        steps = frame["step"] if "step" in frame else range(len(frame))
        bottom = [0.0] * len(frame)
        for phase in PHASES:
            column = f"{phase}_ms"
            if phase == "wait" or column not in frame:
                continue
            values = frame[column].fillna(0.0).tolist()
            ax.bar(steps, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        if "wait_ms" in frame:
            ax.bar(
                steps,
                frame["wait_ms"].fillna(0.0),
                width=0.4,
                fill=False,
                hatch="////",
                edgecolor="black",
                label="of which waiting on copies",
            )
        ax.set_title(f"{name}\n{record.where}", fontsize=9)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("ms")
    axes[0][-1].legend(fontsize=7)
    return save_png(fig, png_path)


def plot_tier_bytes(runs: Mapping[str, RunRecord], png_path: str | Path) -> Path:
    """Host bytes in use per tier (``host_<tier>_nbytes``) at each step's end, a line per run and
    tier; RSS and the unplaced/unpinned fallback totals are not tiers and are left out.

    >>> from offload.tools.run_record import SCHEMA, MachineFacts
    >>> rec = RunRecord(SCHEMA, "", {}, None, {}, MachineFacts("h", "2", None, None),
    ...                 [{"step": 0, "host_dram_nbytes": 1 << 20}])
    >>> plot_tier_bytes({"a": rec}, "/tmp/run_tiers_doctest.png").stat().st_size > 0
    True
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # Runs often hold the same bytes: distinct markers and dashes keep every line visible.
    styles = zip(("o", "s", "^", "D", "v", "x"), ("-", "--", ":", "-."), strict=False)
    for (name, record), (marker, dashes) in zip(runs.items(), styles, strict=False):
        frame = record.steps_frame()
        steps = frame["step"] if "step" in frame else range(len(frame))
        for tier in TIER_NAMES:
            column = f"host_{tier}_nbytes"
            if column in frame:
                ax.plot(
                    steps,
                    frame[column] / (1 << 20),
                    marker=marker,
                    linestyle=dashes,
                    markerfacecolor="none",
                    label=f"{name}: {tier}",
                )
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("MiB in use at step end")
    ax.set_title("host bytes per tier\n" + measured_where(runs), fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_png(fig, png_path)
