"""Where experiment results go and the columns every row carries (``source``: measured or
simulated; ``machine``: where it was measured, or which declared machine was simulated).

File layout only; it must not run experiments or draw plots.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

RESULTS_DIR = Path(__file__).parents[1] / "results"
SIMULATED_DIR = RESULTS_DIR / "paper-simulated"
SOURCES = ("measured", "simulated")


def machine_slug(name: str) -> str:
    """A results-folder name from a device name: lower case, runs of other characters as '-'.

    >>> machine_slug("NVIDIA H100 80GB HBM3")
    'nvidia-h100-80gb-hbm3'
    """
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def this_machine() -> str:
    """The results folder for this machine: the GPU's name when CUDA is there, else
    ``cpu-<cores>core`` (the cores this process may use), so every script files alike.

    >>> import torch
    >>> torch.cuda.is_available() or this_machine() == f"cpu-{len(os.sched_getaffinity(0))}core"
    True
    """
    import torch  # only here: writing a simulated CSV should not need torch

    if torch.cuda.is_available():
        return machine_slug(torch.cuda.get_device_name(0))
    return f"cpu-{len(os.sched_getaffinity(0))}core"


def write_results(rows: Iterable[Mapping] | pd.DataFrame, path: Path) -> pd.DataFrame:
    """Write rows (or a frame) as CSV at ``path`` (folders made), after checking each has
    ``source`` and ``machine``; returns the frame written. Every experiment writes through here.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "x" / "r.csv"
    >>> len(write_results([{"source": "simulated", "machine": "paper-1aic", "v": 1}], out))
    1
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    for column in ("source", "machine"):
        if column not in frame.columns or frame[column].isna().any():
            raise ValueError(f"every result row needs a {column!r} column; add it before writing")
    bad = set(frame["source"]) - set(SOURCES)
    if bad:
        raise ValueError(f"source values {sorted(bad)} are not {SOURCES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame
