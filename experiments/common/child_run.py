"""Run one benchmark case in its own Python process and read back its last stdout line as JSON,
so one case's memory (or out-of-memory failure) cannot touch the next. No measuring here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ChildOutcome:
    """How a child ended: ``ok`` with its values, or ``timeout``/``out_of_memory``/``failed``."""

    status: str
    values: dict = field(default_factory=dict)
    error: str = ""


def run_child(
    command: Sequence[str], timeout_s: float, label: str, echo_stderr: bool = False
) -> ChildOutcome:
    """Run ``command``; its last stdout line must be a JSON object of measurements.

    With ``echo_stderr`` the whole stderr of a failed or timed-out child is printed (a first run
    on a new machine needs the full traceback, not its last lines).

    >>> run_child([sys.executable, "-c", "print('{\\"x\\": 1}')"], 60, "demo").values
    {'x': 1}
    >>> run_child([sys.executable, "-c", "raise MemoryError('CUDA out of memory')"], 60, "m").status
    'out_of_memory'
    """
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        if echo_stderr:
            _echo(label, exc.stderr)
        return ChildOutcome("timeout", error=f"no result within {timeout_s:g} s")
    if done.returncode != 0:
        if echo_stderr:
            _echo(label, done.stderr)
        text = done.stderr or done.stdout or ""
        tail = " | ".join(text.strip().splitlines()[-3:])[:500] or f"exit status {done.returncode}"
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        return ChildOutcome("out_of_memory" if oom else "failed", error=tail)
    lines = done.stdout.strip().splitlines()
    try:
        return ChildOutcome("ok", values=json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        return ChildOutcome("failed", error=f"no JSON result line; stdout ended {lines[-1:]!r}")


def cuda_missing(script: str, covered_by: str) -> bool:
    """True (after saying so on stderr) when this machine has no CUDA GPU for ``script``;
    ``covered_by`` names what checks correctness without one.

    >>> import torch
    >>> cuda_missing("bench_x", "tests/test_x.py") == (not torch.cuda.is_available())
    True
    """
    import torch  # deferred: importing this module must stay cheap for the parent process

    if torch.cuda.is_available():
        return False
    print(
        f"{script} needs a CUDA GPU and this machine has none; run it on the GPU machine "
        f"({covered_by}).",
        file=sys.stderr,
    )
    return True


def _echo(label: str, stderr: str | bytes | None) -> None:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    print(f"--- stderr of {label} ---\n{text}--- end of {label} ---", file=sys.stderr)
