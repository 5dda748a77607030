"""Reading a JSON file the way every file of this project is read: any failure to parse it (bad
JSON, not UTF-8, nested deeper than the parser's stack) is one ValueError naming the problem.
Text only here: what the data must hold is each caller's check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_json_file(path: Path) -> Any:
    """The parsed contents of ``path``; a ValueError says in a few words why it could not be read.

    The caller names the file and what to do in its own error, so each message stays one line.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     deep = Path(d) / "deep.json"
    ...     _ = deep.write_text("[" * 100_000 + "]" * 100_000)
    ...     try:
    ...         parse_json_file(deep)
    ...     except ValueError as exc:
    ...         print(exc)
    nested too deeply
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
