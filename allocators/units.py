"""Byte sizes: parse the strings users write ("64GiB", "512 MB", 4096) and print them back.

Only sizes live here; this module must not know about tiers, nodes or policies.
"""

from __future__ import annotations

import re
from fractions import Fraction

from allocators.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}

# 1 EiB: more memory than any machine this runs on holds, so a larger size is a typo (1e99, a
# count in the wrong unit), and refusing it here keeps it from reaching a loop over chunks.
MAX_SIZE_NBYTES = 1 << 60

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"64GiB"`` or ``"1.5 GB"``.

    ``what`` names the value in the error message, so a user knows which setting was wrong. A
    size must be a whole number of bytes (a float such as ``1.5`` is refused, not truncated) and
    at most ``MAX_SIZE_NBYTES`` (1 EiB).

    >>> parse_size("64GiB")
    68719476736
    >>> parse_size("1.5 kB")
    1500
    >>> parse_size(4096)
    4096
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} = {value!r} is not a size; write bytes (4096) or '64GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} = {value} is negative; sizes are bytes >= 0")
        return _bounded(value, value, what)
    if isinstance(value, float):
        if not value >= 0 or value == float("inf"):
            raise ConfigError(f"{what} = {value} is not a size; write bytes >= 0 or '64GiB'")
        return _bounded(value, value, what)
    if not isinstance(value, str):
        raise ConfigError(
            f"{what} = {value!r} ({type(value).__name__}) is not a size; write bytes or '64GiB'"
        )
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what} = {value!r} is not a size; write '64GiB', '512MiB', '2GB' or a byte count"
        )
    # Exact arithmetic: "1.5 kB" is 1500 bytes, "0.3 B" is not a whole number of bytes.
    return _bounded(value, Fraction(match.group(1)) * _UNITS[unit], what)


def _bounded(value: int | float | str, nbytes: int | float | Fraction, what: str) -> int:
    """``nbytes`` as an int, refusing a fraction of a byte and more than MAX_SIZE_NBYTES."""
    if nbytes > MAX_SIZE_NBYTES:
        raise ConfigError(
            f"{what} = {value!r} is too large: more than {format_bytes(MAX_SIZE_NBYTES)}, more "
            "than any machine holds; write a size such as '64GiB'"
        )
    if nbytes != int(nbytes):
        raise ConfigError(
            f"{what} = {value!r} is not a whole number of bytes; write an integer such as "
            f"{int(nbytes)} or a size such as '64GiB'"
        )
    return int(nbytes)


def format_bytes(nbytes: int | float) -> str:
    """Render a byte count with a binary unit, three significant figures.

    >>> format_bytes(3 * 1024**3)
    '3.00 GiB'
    >>> format_bytes(512)
    '512 B'
    """
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "EiB":
            break
    return f"{value:.2f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
