"""What importing the training runtime costs: `import offload` and `import offload.planning` load
neither rich nor pandas (the tools that draw and tabulate are imported when used), and the session
and the runtime import nothing from offload.tools (tools subscribe to the session)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("rich", "pandas")


@pytest.mark.parametrize("module", ["offload", "offload.planning"])
def test_importing_loads_neither_rich_nor_pandas(module):
    # A fresh interpreter: this one has long imported both.
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize(
    "path",
    [ROOT / "offload" / "session.py", *sorted((ROOT / "offload" / "runtime").glob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_session_and_the_runtime_import_no_tool(path):
    assert [m for m in imported_modules(path) if m.startswith("offload.tools")] == []
