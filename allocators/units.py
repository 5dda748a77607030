"""Byte sizes: parse the strings users write ("64GiB", "512 MB", 4096) and print them back.

Only sizes live here; this module must not know about tiers, nodes or policies.
"""

from __future__ import annotations

import re

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

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"64GiB"`` or ``"1.5 GB"``.

    ``what`` names the value in the error message, so a user knows which setting was wrong.

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
        return value
    if isinstance(value, float):
        if value < 0 or value != value or value == float("inf"):
            raise ConfigError(f"{what} = {value} is not a size; write bytes >= 0 or '64GiB'")
        return int(value)
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
    nbytes = float(match.group(1)) * _UNITS[unit]
    if nbytes == float("inf"):
        raise ConfigError(
            f"{what} = {value!r} is too large to be a size; write '64GiB', '512MiB' or bytes"
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
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            break
    return f"{value:.2f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
