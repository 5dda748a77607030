"""Read one sysfs attribute file as text or an integer, with None for a file that is missing, and
tell the live /sys from a captured copy. What the values mean belongs to the modules that read them.
"""

from __future__ import annotations

from pathlib import Path

LIVE_SYSFS = Path("/sys")


def is_live(root: Path) -> bool:
    """True when ``root`` is the running kernel's sysfs rather than a captured fixture tree.

    >>> is_live(Path("/sys")), is_live(Path("tests/fixtures/sysfs/two-socket"))
    (True, False)
    """
    return root.resolve() == LIVE_SYSFS


def read_text(path: Path) -> str | None:
    """The file's content without surrounding whitespace, or None if it cannot be read.

    >>> read_text(Path("/nonexistent/numa_node")) is None
    True
    """
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_int(path: Path, base: int = 10) -> int | None:
    """The file's content as an integer (``base=16`` for ``0x10de``), or None if absent or not one.

    >>> read_int(Path("/nonexistent/vendor"), base=16) is None
    True
    """
    text = read_text(path)
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None
