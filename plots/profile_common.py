"""What the ``offload-profile`` figures share: the headless backend, reading one benchmark's rows
from a profile CSV, and writing the PNG. Files only; it must not measure or pick what to draw.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["benchmark_rows", "plt", "save_png"]


def benchmark_rows(csv_path: str | Path, benchmark: str) -> pd.DataFrame:
    """The rows of the profile CSV at ``csv_path`` whose ``benchmark`` column is ``benchmark``.

    >>> import io
    >>> benchmark_rows(io.StringIO("benchmark,median\\nmemory,1\\nlatency,2\\n"), "latency")
      benchmark  median
    1   latency       2
    """
    frame = pd.read_csv(csv_path)
    return frame[frame["benchmark"] == benchmark]


def save_png(fig: plt.Figure, png_path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``png_path`` (120 dpi), close it and return the path.

    >>> fig, _ = plt.subplots()
    >>> save_png(fig, "/tmp/profile_common_doctest.png").name
    'profile_common_doctest.png'
    """
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
