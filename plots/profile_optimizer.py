"""Figure: CPU AdamW ms per step against tensor size, one line per state placement and kernel,
from an ``offload-profile`` optimizer CSV (the paper's local vs CXL table). Reads the CSV only.
"""

from __future__ import annotations

from pathlib import Path

from plots.profile_common import benchmark_rows, plt, save_png


def plot(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw ``profile_optimizer.csv`` as ms/step vs elements (log-log) and write ``png_path``.

    >>> plot("offload-profile-host/profile_optimizer.csv", "/tmp/adamw.png")  # doctest: +SKIP
    PosixPath('/tmp/adamw.png')
    """
    rows = benchmark_rows(csv_path, "optimizer")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (placement, kernel), group in rows.groupby(["placement", "kernel"]):
        group = group.sort_values("elements")
        ax.plot(group["elements"], group["median"], marker="o", label=f"{placement} ({kernel})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("elements per tensor")
    ax.set_ylabel("ms per AdamW step (median)")
    ax.set_title("CPU AdamW step by state placement, measured")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, png_path)
