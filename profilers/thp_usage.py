"""How much of a buffer the kernel actually backed with transparent huge pages (from smaps).

Only reading /proc/self/smaps lives here; asking for huge pages is the buffer allocator's job.
"""

from __future__ import annotations

import re
from pathlib import Path

_HEADER_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s")


def thp_backed_nbytes(
    address: int, nbytes: int, smaps: Path = Path("/proc/self/smaps")
) -> int | None:
    """Bytes of ``[address, address + nbytes)`` in AnonHugePages, or None if smaps is unreadable.

    A mapping that only partly overlaps the range counts in proportion to the overlap (smaps
    gives one total per mapping, not per page).

    >>> import ctypes
    >>> buf = ctypes.create_string_buffer(1 << 16)
    >>> thp_backed_nbytes(ctypes.addressof(buf), 1 << 16) in (None, 0)
    True
    """
    try:
        text = smaps.read_text()
    except OSError:
        return None
    end = address + nbytes
    total = 0.0
    overlap = 0
    span = 1
    for line in text.splitlines():
        header = _HEADER_RE.match(line)
        if header:
            lo, hi = int(header.group(1), 16), int(header.group(2), 16)
            overlap = max(0, min(hi, end) - max(lo, address))
            span = max(1, hi - lo)
        elif overlap and line.startswith("AnonHugePages:"):
            kib = int(line.split()[1])
            total += kib * 1024 * overlap / span
    return int(total)
