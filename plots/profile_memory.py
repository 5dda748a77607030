"""Figure: CPU stream bandwidth (GiB/s) against thread count, one line per node and kernel,
from an ``offload-profile`` memory CSV. Reads the CSV only; never measures.
"""

from __future__ import annotations

from pathlib import Path

from plots.profile_common import benchmark_rows, plt, save_png


def plot(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw ``profile_memory.csv`` as GiB/s vs threads and write ``png_path``.

    >>> plot("offload-profile-host/profile_memory.csv", "/tmp/memory.png")  # doctest: +SKIP
    PosixPath('/tmp/memory.png')
    """
    rows = benchmark_rows(csv_path, "memory")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (placement, case), group in rows.groupby(["placement", "case"]):
        group = group.sort_values("threads")
        ax.errorbar(
            group["threads"],
            group["median"],
            yerr=[group["median"] - group["p5"], group["p95"] - group["median"]],
            marker="o",
            capsize=3,
            label=f"{placement} {case}",
        )
    ax.set_xlabel("threads")
    ax.set_ylabel("GiB/s (median, p5-p95)")
    ax.set_title("CPU memory bandwidth per node, measured")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, png_path)
