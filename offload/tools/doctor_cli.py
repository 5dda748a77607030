"""`offload doctor`: check this machine (or a captured sysfs tree) for offload and say what to fix.

Wiring and output only: the checks themselves are offload.tools.doctor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rich.console import Console
from rich.table import Table

from allocators.errors import ConfigError
from allocators.policies import parse_budget_args
from allocators.table_width import wrap_not_cut
from offload.config import OffloadConfig, resolve_config
from offload.planning.activation_bytes import ACTIVATION_MODES
from offload.tools.doctor import CheckResult, run_checks

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
    parser.add_argument(
        "--config",
        help="offload YAML config whose settings to check (default: OFFLOAD_CONFIG's file); "
        "settings resolve as in offload.enable(): these options, the config, OFFLOAD_*, defaults",
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="TIER=SIZE",
        help="a tier budget such as dram=64GiB (repeatable; replaces the config's budgets)",
    )
    parser.add_argument(
        "--model",
        help="also check that this model's offloaded host memory fits: a name "
        "(qwen2.5-7b, llama-1.1b, ...) or a transformers config.json",
    )
    parser.add_argument("--seq", type=int, default=4096, help="with --model: tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="with --model: micro-batch")
    parser.add_argument(
        "--optimizer", choices=("adam", "lion"), default="adam", help="with --model (AdamW: adam)"
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="with --model: params"
    )
    parser.add_argument(
        "--activations",
        choices=ACTIVATION_MODES,
        help="with --model: what enable() offloads (default: as enable() resolves it, "
        f"{OffloadConfig().activations!r} unless the config or OFFLOAD_ACTIVATIONS say otherwise)",
    )
    parser.add_argument(
        "--loss-chunk-tokens",
        type=int,
        help="with --model: the loss in chunks of this many tokens (no fp32 log-probs on the host)",
    )
    parser.add_argument(
        "--grad-accumulation",
        action="store_true",
        help="with --model: more than one backward per step (a staging buffer for gradients); "
        "also on when the config's grad_accumulation_steps is above 1",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.set_defaults(func=_run)


def settings_of(args: argparse.Namespace) -> OffloadConfig:
    """The settings offload.enable() would run with, this command's options passed as its
    arguments (resolve_config: options, then --config or OFFLOAD_CONFIG, OFFLOAD_*, defaults).

    >>> ns = argparse.Namespace(config=None, budget=["dram=1GiB"], activations=None,
    ...                         loss_chunk_tokens=None)
    >>> settings_of(ns).budgets
    {'dram': 1073741824}
    """
    given: dict[str, object] = {}
    if args.budget:
        given["budgets"] = parse_budget_args(args.budget)
    for name in ("activations", "loss_chunk_tokens"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    return resolve_config(args.config, given)


def _run(args: argparse.Namespace) -> int:
    for name in ("seq", "batch", "loss_chunk_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value} must be at least 1, e.g. {flag} 1")
    settings = settings_of(args)
    results = run_checks(args.sysfs_root, settings.budgets or None)
    if args.model:
        results.append(_model_check(args, settings))
    failed = any(r.failed for r in results)
    if args.json:
        report = {"failed": failed, "checks": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        Console().print(_table(results))
    return 1 if failed else 0


def _model_check(args: argparse.Namespace, settings: OffloadConfig) -> CheckResult:
    from allocators.sysfs_topology import discover
    from offload.planning.host_layout import HostLayout
    from offload.planning.model_shapes import load_model_shape
    from offload.tools.doctor_model_fit import ModelWorkload, check_model_fits

    layout = HostLayout(
        optimizer=args.optimizer,
        grad_nbytes_per_param=4 if args.dtype == "fp32" else 2,
        grad_staging=args.grad_accumulation or settings.grad_accumulation_steps > 1,
        activations=settings.activations,
        loss_chunk_tokens=settings.loss_chunk_tokens,
    )
    work = ModelWorkload(
        load_model_shape(args.model), seq=args.seq, batch=args.batch, layout=layout
    )
    budget = sum(settings.budgets.values()) if settings.budgets else None
    return check_model_fits(discover(args.sysfs_root, use_nvml=False), work, budget)


def _table(results: list[CheckResult]) -> Table:
    table = Table(title="offload doctor", title_justify="left")
    for header in ("check", "status", "finding", "what to do"):
        table.add_column(header)
    for r in results:
        table.add_row(r.check, f"[{_STYLES[r.status]}]{r.status}[/]", r.finding, r.fix)
    return wrap_not_cut(table)
