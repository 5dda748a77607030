"""The shared shape of this project's command-line tools: subcommands that live in their own
modules, and errors of ours printed as one readable line (exit 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from allocators.errors import OffloadError


def run_subcommands(
    prog: str, description: str, modules: Sequence[str], argv: Sequence[str] | None = None
) -> int:
    """Build a parser from subcommand modules and run the chosen one; return the exit code.

    Each module has ``register(subparsers)``, which adds its parser and sets ``func`` (a callable
    taking the parsed args and returning an exit code).

    >>> run_subcommands("demo", "demo tool", [], ["--help"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OffloadError, OSError) as exc:
        # Our errors already say what to do, and an OSError here is a path the user gave (a
        # folder where a file was meant, no permission); a traceback would only hide that line.
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_error(exc: BaseException) -> None:
    """``error: <message>`` on stderr as one line, the message printed as written: a path or
    host name with ``[`` in it is text, not rich markup to interpret.

    >>> print_error(FileNotFoundError("no file 'runs/[old]/run.json'"))  # doctest: +SKIP
    error: no file 'runs/[old]/run.json'
    """
    message = " ".join(str(exc).split()) or type(exc).__name__
    line = Text.assemble(("error:", "bold red"), " ", message)
    Console(stderr=True, soft_wrap=True).print(line, highlight=False)
