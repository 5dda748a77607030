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

    >>> import tempfile
    >>> smaps = Path(tempfile.mkdtemp()) / "smaps"
    >>> _ = smaps.write_text("7f0000000000-7f0000400000 rw-p 00000000 00:00 0\\n"
    ...                      "AnonHugePages:      2048 kB\\n")
    >>> thp_backed_nbytes(0x7F0000000000, 4 << 20, smaps) // (1 << 20)
    2
    >>> thp_backed_nbytes(0x7F0000000000, 1 << 20, smaps) // (1 << 10)  # a quarter of the map
    512
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
