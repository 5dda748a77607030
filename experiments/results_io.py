"""Where experiment results go and the columns every row carries (``source``: measured or
simulated; ``machine``: where it was measured, or which declared machine was simulated).

File layout only; it must not run experiments or draw plots.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

RESULTS_DIR = Path(__file__).parent / "results"
SIMULATED_DIR = RESULTS_DIR / "paper-simulated"
SOURCES = ("measured", "simulated")


def this_machine() -> str:
    """A name for the machine running this script (its hostname, lower case).

    >>> this_machine() == platform.node().lower() or this_machine() == "unknown"
    True
    """
    return platform.node().lower() or "unknown"


def write_results(rows: Iterable[Mapping], path: Path) -> pd.DataFrame:
    """Write rows as CSV at ``path`` (folders made), after checking each has ``source`` and
    ``machine``; returns the frame written.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "x" / "r.csv"
    >>> len(write_results([{"source": "simulated", "machine": "paper-1aic", "v": 1}], out))
    1
    """
    frame = pd.DataFrame(list(rows))
    for column in ("source", "machine"):
        if column not in frame.columns or frame[column].isna().any():
            raise ValueError(f"every result row needs a {column!r} column; add it before writing")
    bad = set(frame["source"]) - set(SOURCES)
    if bad:
        raise ValueError(f"source values {sorted(bad)} are not {SOURCES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame
