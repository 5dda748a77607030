"""Linux CPU and node list syntax ("0-15,32-47"): parse it into ids and print ids back compactly.

Only the list syntax lives here; this module must not read sysfs or know about nodes and tiers.
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_cpu_list(text: str, *, what: str = "cpu list") -> tuple[int, ...]:
    """Return the sorted ids in a kernel list such as ``"0-3,8,10-11"``; ``""`` gives ``()``.

    ``what`` names the value in the error message (a sysfs path or a YAML key path).

    >>> parse_cpu_list("0-3,8,10-11")
    (0, 1, 2, 3, 8, 10, 11)
    >>> parse_cpu_list("\\n")
    ()
    """
    ids: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            raise ValueError(
                f"{what} = {text.strip()!r} is not a CPU/node list; write ranges like '0-15,32-47'"
            ) from None
        if first < 0 or last < first:
            raise ValueError(
                f"{what} = {text.strip()!r} has the range {part!r}; write low-high with 0 <= low <= high"
            )
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_cpu_list(ids: Iterable[int]) -> str:
    """Print ids as compact kernel-style ranges, the inverse of :func:`parse_cpu_list`.

    >>> format_cpu_list([0, 1, 2, 3, 8, 10, 11])
    '0-3,8,10-11'
    >>> format_cpu_list([])
    ''
    """
    ordered = sorted(set(ids))
    pieces: list[str] = []
    start = prev = None
    for i in ordered:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            pieces.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    if start is not None:
        pieces.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(pieces)
