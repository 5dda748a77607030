"""Keep the command-line tables readable in an 80-column terminal: rich cuts a cell that does
not fit with an ellipsis ('6.254…', 'movab…'), which hides numbers and headers. It must not
change what a table says, only how its lines break.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Longer words (paths, long reasons) may fold onto the next line rather than widen a column.
MAX_KEPT_WORD = 16


def wrap_not_cut(table: Table, width: int | None = None) -> Table:
    """Fit ``table`` in ``width`` columns (default: the terminal's) by wrapping at spaces, never
    inside a number or a word: a table that fits is left as it is; one that does not gets
    column widths of at least the longest word (up to ``MAX_KEPT_WORD`` characters) of each
    column's header and cells, the room left going first to whole cells (a number beside its
    unit), then to headers, and what still does not fit folds onto the next line instead of
    ending in '…'.

    >>> import io
    >>> table = Table("step", "loss plain", "movable", "D2H")
    >>> table.add_row("0", "6.254712", "no", "39.06 MiB")
    >>> console = Console(width=38, file=io.StringIO())
    >>> console.print(wrap_not_cut(table, width=38))
    >>> text = console.file.getvalue()
    >>> "…" in text, "6.254712" in text, "movable" in text
    (False, True, True)
    """
    width = Console().width if width is None else width
    for column in table.columns:
        column.overflow = "fold"
    columns = table.columns
    natural = [
        max([_widest_line(column.header), *map(_widest_line, column.cells)]) for column in columns
    ]
    least = [
        max([1, *(len(w) for w in _words(column) if len(w) <= MAX_KEPT_WORD)]) for column in columns
    ]
    room = width - _overhead(table)
    if sum(natural) <= room:
        return table
    widths = list(least)
    spare = max(0, room - sum(least))
    # Whole cells first (a number beside its unit), the narrowest needs first; then headers.
    whole = [
        max(m, max(map(_widest_line, c.cells), default=0))
        for m, c in zip(least, columns, strict=True)
    ]
    for i in sorted(range(len(columns)), key=lambda i: whole[i] - least[i]):
        give = min(spare, whole[i] - widths[i])
        widths[i] += give
        spare -= give
    for i in range(len(columns)):
        give = min(spare, natural[i] - widths[i])
        widths[i] += max(0, give)
        spare -= max(0, give)
    for column, column_width in zip(columns, widths, strict=True):
        column.no_wrap = False
        column.width = column_width
    return table


def _plain(cell: object) -> str:
    # A str cell is rich markup ("[green]ok[/]"): its width is that of the text it shows.
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return cell.plain if isinstance(cell, Text) else str(cell)


def _widest_line(cell: object) -> int:
    return max((len(line) for line in _plain(cell).splitlines()), default=0)


def _words(column) -> list[str]:
    return [word for cell in (column.header, *column.cells) for word in _plain(cell).split()]


def _overhead(table: Table) -> int:
    """Characters a row takes besides its cells: borders and padding."""
    count = len(table.columns)
    _, right, _, left = table.padding
    padding = (left + right) * count - (0 if table.pad_edge else left + right)
    if table.box is None:
        return padding
    return padding + (count + 1 if table.show_edge else count - 1)
