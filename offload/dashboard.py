"""The live dashboard's picture: a snapshot of the runtime's counters, drawn as a rich panel or as one
plain log line. Pure functions of the snapshot; it must not read the session or start threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from allocators.units import format_bytes

BAR_WIDTH = 32


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

    >>> from rich.console import Console
    >>> console = Console(record=True, width=100, file=open("/dev/null", "w"))
    >>> console.print(render_dashboard(DashboardSnapshot(step=None, memory=())))
    >>> "waiting for the first optimizer step" in console.export_text()
    True
    """
    parts: list[RenderableType] = [
        _heading("memory: used / budget"),
        _memory_table(snapshot.memory),
    ]
    if snapshot.step is None:
        parts.append("waiting for the first optimizer step")
    else:
        parts += [
            _heading(f"transfers, last step ({_ceiling_text(snapshot)})"),
            _transfer_table(snapshot),
            _heading(f"step split: {_num(snapshot.step_ms, 1)} ms"),
            _phase_table(snapshot),
            _throughput_line(snapshot),
        ]
    title = "offload" if snapshot.step is None else f"offload · step {snapshot.step}"
    return Panel(Group(*parts), title=title, expand=False)


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


def _memory_table(bars: tuple[MemoryBar, ...]) -> Table:
    table = _table()
    for column in ("tier", "", "used", "budget", ""):
        table.add_column(column)
    for bar in bars:
        table.add_row(
            bar.label,
            ProgressBar(
                total=max(bar.budget_nbytes, 1), completed=bar.used_nbytes, width=BAR_WIDTH
            ),
            format_bytes(bar.used_nbytes),
            format_bytes(bar.budget_nbytes),
            _percent(bar.used_nbytes / bar.budget_nbytes if bar.budget_nbytes else None),
        )
    if not bars:
        table.add_row("no memory tier in use", "", "", "", "")
    return table


def _transfer_table(snapshot: DashboardSnapshot) -> Table:
    table = _table()
    for column in ("direction", "", "GB/s", "ceiling GB/s"):
        table.add_column(column)
    for name, rate, ceiling in (
        ("H2D", snapshot.h2d_gb_per_s, snapshot.h2d_ceiling_gb_per_s),
        ("D2H", snapshot.d2h_gb_per_s, snapshot.d2h_ceiling_gb_per_s),
    ):
        bar = (
            ProgressBar(total=ceiling, completed=min(rate or 0.0, ceiling), width=BAR_WIDTH)
            if ceiling
            else ""
        )
        table.add_row(name, bar, _num(rate, 2), _num(ceiling, 1) if ceiling else "none measured")
    return table


def _phase_table(snapshot: DashboardSnapshot) -> Table:
    step_ms = snapshot.step_ms
    table = _table()
    for column in ("phase", "", "ms", "share"):
        table.add_column(column)
    for name, value in (
        ("forward", snapshot.forward_ms),
        ("backward", snapshot.backward_ms),
        ("optimizer", snapshot.optimizer_ms),
        ("waiting (within the above)", snapshot.wait_ms),
    ):
        share = value / step_ms if value is not None and step_ms else None
        table.add_row(
            name,
            ProgressBar(total=1.0, completed=min(share or 0.0, 1.0), width=BAR_WIDTH),
            _num(value, 1),
            _percent(share),
        )
    return table


def _heading(text: str) -> Text:
    return Text(text, style="bold")


def _table() -> Table:
    return Table(box=None, pad_edge=False, header_style="dim")


def _throughput_line(snapshot: DashboardSnapshot) -> str:
    return (
        f"hidden transfer {_percent(snapshot.hidden_transfer_fraction)} · "
        f"CPU optimizer {_sci(snapshot.optimizer_elements_per_s)} elements/s · "
        f"{_num(snapshot.steps_per_s, 2)} steps/s · {_num(snapshot.tokens_per_s, 0)} tokens/s"
    )


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
