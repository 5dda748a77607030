"""What follows a training run from outside the runtime: one row per optimizer step, which the
session publishes to its subscribers (the dashboard, the run record). The runtime knows only this
protocol, never the tools behind it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

# One optimizer step, as a row of sess.report(): phase ms, bytes and GB/s, host bytes per tier.
StepRow = dict[str, Any]


class StepSubscriber(Protocol):
    """Receives a session's step rows: ``sess.subscribe(subscriber)``; ``disable()`` closes it.

    >>> class Count:
    ...     steps = 0
    ...     def on_step(self, row): self.steps += 1
    ...     def on_restore(self, rows): self.steps = len(rows)
    ...     def close(self): pass
    >>> sess.subscribe(Count())  # doctest: +SKIP
    """

    def on_step(self, row: StepRow) -> None:
        """A finished step's row. Runs on the training thread inside ``optimizer.step()``, so it
        must be quick (keep the row, draw later) and must not raise."""

    def on_restore(self, rows: list[StepRow]) -> None:
        """The session's rows were replaced by those of a restored state (``load_state_dict``)."""

    def close(self) -> None:
        """The session is being disabled: finish what is left; no row follows."""


class RunLog(StepSubscriber, Protocol):
    """A subscriber that keeps the run and writes it to a file (``OffloadSession.save``)."""

    def save(self, path: str | Path) -> Path:
        """Write the run received so far to ``path`` and return it."""
