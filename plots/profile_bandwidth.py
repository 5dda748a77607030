"""Figure: GPU copy bandwidth (GiB/s) against copy size, one panel per direction, one line per
placement and memory kind, from an ``offload-profile`` bandwidth CSV. Reads the CSV only.
"""

from __future__ import annotations

from pathlib import Path

from plots.profile_common import benchmark_rows, plt, save_png


def plot(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw one-stream rows of ``profile_bandwidth.csv`` per direction and write ``png_path``.

    >>> plot("offload-profile-host/profile_bandwidth.csv", "/tmp/bw.png")  # doctest: +SKIP
    PosixPath('/tmp/bw.png')
    """
    rows = benchmark_rows(csv_path, "bandwidth")
    rows = rows[rows["streams"] == 1]
    directions = [d for d in ("h2d", "d2h", "both") if d in set(rows["case"])]
    fig, axes = plt.subplots(
        1, max(1, len(directions)), figsize=(5 * max(1, len(directions)), 4), squeeze=False
    )
    for ax, direction in zip(axes[0], directions, strict=False):
        for (placement, memory), group in rows[rows["case"] == direction].groupby(
            ["placement", "memory"]
        ):
            group = group.sort_values("nbytes")
            ax.plot(group["nbytes"], group["median"], marker="o", label=f"{placement} {memory}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("copy size (bytes)")
        ax.set_ylabel("GiB/s (median)")
        ax.set_title(f"{direction}, measured")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return save_png(fig, png_path)
