"""`offload doctor`: check this machine (or a captured sysfs tree) for offload and say what to fix.

Wiring and output only: the checks themselves are offload.doctor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console
from rich.table import Table

from offload.config import OffloadConfig
from offload.doctor import CheckResult, parse_budget_args, run_checks

_STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def register(subparsers) -> None:
    """Add the ``doctor`` subcommand to the ``offload`` tool's parser.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["doctor", "--budget", "dram=1GiB", "--json"]).budget
    ['dram=1GiB']
    """
    parser = subparsers.add_parser(
        "doctor",
        help="check mbind rights, huge pages, movable CXL, memlock, GPUs and budgets; say what to fix",
        description="Check this machine for offload; exit 1 when a check fails.",
    )
    parser.add_argument("--sysfs-root", default="/sys", help="sysfs tree to read (default /sys)")
    parser.add_argument("--config", help="offload YAML config whose budgets to check")
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="TIER=SIZE",
        help="a tier budget such as dram=64GiB (repeatable; overrides --config)",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    budgets: dict[str, int | str] = {}
    if args.config:
        budgets.update(OffloadConfig.from_yaml(args.config).budgets)
    budgets.update(parse_budget_args(args.budget))
    results = run_checks(args.sysfs_root, budgets or None)
    failed = any(r.failed for r in results)
    if args.json:
        report = {"failed": failed, "checks": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        Console().print(_table(results))
    return 1 if failed else 0


def _table(results: list[CheckResult]) -> Table:
    table = Table(title="offload doctor", title_justify="left")
    for header in ("check", "status", "finding", "what to do"):
        table.add_column(header)
    for r in results:
        table.add_row(r.check, f"[{_STYLES[r.status]}]{r.status}[/]", r.finding, r.fix)
    return table
