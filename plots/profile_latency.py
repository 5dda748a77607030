"""Figure: load latency (ns) against buffer size, one line per node and page size, from an
``offload-profile`` latency CSV. Reads the CSV only; never measures.
"""

from __future__ import annotations

from pathlib import Path

from plots.profile_common import benchmark_rows, plt, save_png


def plot(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw ``profile_latency.csv`` as latency vs size (log-log) and write ``png_path``.

    >>> plot("offload-profile-host/profile_latency.csv", "/tmp/latency.png")  # doctest: +SKIP
    PosixPath('/tmp/latency.png')
    """
    rows = benchmark_rows(csv_path, "latency")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (placement, page_size), group in rows.groupby(["placement", "page_size"]):
        group = group.sort_values("nbytes")
        ax.plot(
            group["nbytes"], group["median"], marker="o", label=f"{placement}, {page_size} pages"
        )
        ax.fill_between(group["nbytes"], group["p5"], group["p95"], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("buffer size (bytes)")
    ax.set_ylabel("load-to-use latency (ns, median, p5-p95 band)")
    degraded = (
        " [DEGRADED numpy kernel]"
        if rows["degraded"].astype(str).str.lower().eq("true").any()
        else ""
    )
    ax.set_title(f"Pointer-chase latency, measured{degraded}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_png(fig, png_path)
