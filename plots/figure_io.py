"""Reading result CSVs and saving figures for the plot modules: every figure says in its title
whether its numbers were measured or simulated. Files only; no experiment runs from here.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plots are files; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent.parent / "experiments" / "results"
PLOTS_DIR = Path(__file__).resolve().parent


def load(name: str, results_dir: Path = RESULTS_DIR) -> pd.DataFrame:
    """Every ``<machine>/<name>.csv`` under the results folder, concatenated.

    >>> sorted(set(load("striping.csv")["source"]))
    ['simulated']
    """
    frames = [pd.read_csv(path) for path in sorted(results_dir.glob(f"*/{name}"))]
    if not frames:
        raise FileNotFoundError(
            f"no {name} under {results_dir}; run the experiment that writes it first"
        )
    return pd.concat(frames, ignore_index=True)


def source_label(frame: pd.DataFrame) -> str:
    """``"simulated on paper-1aic"`` / ``"measured on h"``: what a figure's numbers are.

    >>> source_label(pd.DataFrame({"source": ["simulated"], "machine": ["paper-1aic"]}))
    'simulated on paper-1aic'
    """
    pairs = sorted({(s, m) for s, m in zip(frame["source"], frame["machine"], strict=True)})
    return "; ".join(f"{s} on {m}" for s, m in pairs)


def save(fig: plt.Figure, name: str, out_dir: Path = PLOTS_DIR) -> Path:
    """Write ``<name>.png`` and close the figure; returns the path."""
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
