"""The live dashboard's picture: a snapshot of the runtime's counters, drawn as a rich panel or as one
plain log line. Pure functions of the snapshot; it must not read the session or start threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import RenderableType
from rich.panel import Panel
from rich.text import Text

from allocators.units import format_bytes

BAR_WIDTH = 32
LABEL_WIDTH = 14


@dataclass(frozen=True)
class MemoryBar:
    """Bytes in use on one memory (``"HBM cuda:0"``, ``"DRAM node 0"``, ``"CXL node 2"``) and
    what it may hold: the tier budget of a host node, the device's capacity for HBM."""

    label: str
    used_nbytes: int
    budget_nbytes: int


@dataclass(frozen=True)
class DashboardSnapshot:
    """What the dashboard shows at one moment; None where nothing is known (yet).

    Phase times, rates and the hidden fraction are those of optimizer step ``step`` (the last one
    finished); ``steps_per_s``, ``tokens_per_s`` and ``optimizer_elements_per_s`` are averaged over
    the last few steps. ``wait_ms`` is host time blocked on copies *inside* the other phases, so
    it is shown beside them, not added to the step. Ceilings are in GB/s (1e9 bytes) like the
    achieved rates; ``ceiling_source`` says where they came from (None: nothing measured).
    """

    step: int | None
    memory: tuple[MemoryBar, ...]
    forward_ms: float | None = None
    backward_ms: float | None = None
    optimizer_ms: float | None = None
    wait_ms: float | None = None
    h2d_gb_per_s: float | None = None
    d2h_gb_per_s: float | None = None
    h2d_ceiling_gb_per_s: float | None = None
    d2h_ceiling_gb_per_s: float | None = None
    ceiling_source: str | None = None
    hidden_transfer_fraction: float | None = None
    optimizer_elements_per_s: float | None = None
    steps_per_s: float | None = None
    tokens_per_s: float | None = None

    @property
    def step_ms(self) -> float | None:
        """Forward + backward + optimizer of the last step (waiting is inside these)."""
        phases = (self.forward_ms, self.backward_ms, self.optimizer_ms)
        return None if any(p is None for p in phases) else sum(phases)


def render_dashboard(snapshot: DashboardSnapshot) -> RenderableType:
    """The live panel for ``snapshot``: memory bars, transfer rates against their ceilings, the
    step's phases, and throughput.

    Drawn as one Text of fixed-width columns: rich tables cost about 10 ms a frame on a small
    core, and this runs a few times a second beside the training thread.

    >>> import io
    >>> from rich.console import Console
    >>> console = Console(record=True, width=100, file=io.StringIO())
    >>> console.print(render_dashboard(DashboardSnapshot(step=None, memory=())))
    >>> "waiting for the first optimizer step" in console.export_text()
    True
    """
    text = Text()
    _heading(text, "memory: used / budget")
    for bar in snapshot.memory:
        share = bar.used_nbytes / bar.budget_nbytes if bar.budget_nbytes else None
        text.append(f"{bar.label:<{LABEL_WIDTH}}")
        _bar(text, share)
        used, budget = format_bytes(bar.used_nbytes), format_bytes(bar.budget_nbytes)
        text.append(f" {used:>10} / {budget:<10} {_percent(share):>4}\n")
    if not snapshot.memory:
        text.append("no memory tier in use\n")
    if snapshot.step is None:
        text.append("waiting for the first optimizer step")
        return Panel(text, title="offload", expand=False)
    _heading(text, f"transfers, last step ({_ceiling_text(snapshot)})")
    for name, rate, ceiling in (
        ("H2D", snapshot.h2d_gb_per_s, snapshot.h2d_ceiling_gb_per_s),
        ("D2H", snapshot.d2h_gb_per_s, snapshot.d2h_ceiling_gb_per_s),
    ):
        text.append(f"{name:<{LABEL_WIDTH}}")
        _bar(text, (rate or 0.0) / ceiling if ceiling else None)
        limit = f"of {_num(ceiling, 1)} GB/s" if ceiling else "(ceiling: none measured)"
        text.append(f" {_num(rate, 2):>10} GB/s {limit}\n")
    step_ms = snapshot.step_ms
    _heading(text, f"step split: {_num(step_ms, 1)} ms (waiting is within the other phases)")
    for name, value in (
        ("forward", snapshot.forward_ms),
        ("backward", snapshot.backward_ms),
        ("optimizer", snapshot.optimizer_ms),
        ("waiting", snapshot.wait_ms),
    ):
        share = value / step_ms if value is not None and step_ms else None
        text.append(f"{name:<{LABEL_WIDTH}}")
        _bar(text, share)
        text.append(f" {_num(value, 1):>10} ms   {_percent(share):>4}\n")
    text.append(
        f"hidden transfer {_percent(snapshot.hidden_transfer_fraction)} · "
        f"CPU optimizer {_sci(snapshot.optimizer_elements_per_s)} elements/s · "
        f"{_num(snapshot.steps_per_s, 2)} steps/s · {_num(snapshot.tokens_per_s, 0)} tokens/s"
    )
    return Panel(text, title=f"offload · step {snapshot.step}", expand=False)


def log_line(snapshot: DashboardSnapshot) -> str:
    """One plain line for ``snapshot``: what the panel shows, for logs and non-terminals.

    >>> log_line(DashboardSnapshot(step=3, memory=(MemoryBar("DRAM node 0", 1 << 20, 1 << 30),),
    ...     forward_ms=10.0, backward_ms=20.0, optimizer_ms=5.0, wait_ms=1.0))
    'offload step 3: forward 10.0 ms, backward 20.0 ms, optimizer 5.0 ms, waiting 1.0 ms | h2d - GB/s, d2h - GB/s (no ceiling measured) | hidden - | optimizer - elements/s | - steps/s, - tokens/s | DRAM node 0 1.00 MiB / 1.00 GiB'
    """
    phases = ", ".join(
        f"{name} {_num(value, 1)} ms"
        for name, value in (
            ("forward", snapshot.forward_ms),
            ("backward", snapshot.backward_ms),
            ("optimizer", snapshot.optimizer_ms),
            ("waiting", snapshot.wait_ms),
        )
    )
    rates = (
        f"h2d {_num(snapshot.h2d_gb_per_s, 2)} GB/s, d2h {_num(snapshot.d2h_gb_per_s, 2)} GB/s "
        f"({_ceiling_text(snapshot)})"
    )
    memory = ", ".join(
        f"{bar.label} {format_bytes(bar.used_nbytes)} / {format_bytes(bar.budget_nbytes)}"
        for bar in snapshot.memory
    )
    return (
        f"offload step {snapshot.step}: {phases} | {rates} | "
        f"hidden {_percent(snapshot.hidden_transfer_fraction)} | "
        f"optimizer {_sci(snapshot.optimizer_elements_per_s)} elements/s | "
        f"{_num(snapshot.steps_per_s, 2)} steps/s, {_num(snapshot.tokens_per_s, 0)} tokens/s | "
        f"{memory or 'no host memory in use'}"
    )


def _heading(text: Text, title: str) -> None:
    text.append(title + "\n", style="bold")


def _bar(text: Text, fraction: float | None) -> None:
    # Distinct characters for filled and empty, so the bar reads without colour too.
    if fraction is None:
        text.append(" " * BAR_WIDTH)
        return
    filled = round(min(max(fraction, 0.0), 1.0) * BAR_WIDTH)
    text.append("█" * filled, style="magenta")
    text.append("░" * (BAR_WIDTH - filled), style="grey30")


def _ceiling_text(snapshot: DashboardSnapshot) -> str:
    if snapshot.ceiling_source is None:
        return "no ceiling measured"
    return f"ceiling from {snapshot.ceiling_source}"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"
