"""`offload plan`: place a model's host tensor groups with a policy and print the predicted phases,
or (``--decode``) place its KV cache and print the predicted decode step, as rich tables or JSON.
Wiring and printing only: the work is offload.planning.planner.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from allocators.errors import OffloadError
from allocators.policies import POLICY_NAMES, parse_budget_args
from allocators.table_width import wrap_not_cut
from allocators.topology import Topology
from allocators.topology_command import load_topology
from allocators.units import format_bytes
from offload.planning.model_shapes import MODELS, load_model_shape
from offload.planning.planner import (
    DecodePlan,
    Plan,
    PlanError,
    plan,
    plan_decode,
    predicted_phases,
)
from offload.planning.runtime_step import OUR_RUNTIME, host_groups
from offload.planning.simulator.decode import DecodeConfig
from offload.planning.simulator.rates import GIB, SimRates, load_rates
from offload.planning.simulator.step import DEEPSPEED_ZERO3, StepConfig

RUNTIMES: dict[str, StepConfig] = {"ours": OUR_RUNTIME, "deepspeed-zero3": DEEPSPEED_ZERO3}


def register(subparsers) -> None:
    """Add the ``plan`` subcommand.

    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> args = parser.parse_args(["plan", "--model", "qwen2.5-7b", "--topology", "paper-1aic",
    ...                           "--budget", "dram=200GiB", "--budget", "cxl=256GiB"])
    >>> args.budget, args.policy
    (['dram=200GiB', 'cxl=256GiB'], 'planned')
    """
    parser = subparsers.add_parser(
        "plan",
        help="place a model's host tensors with a policy and predict the step's phases",
        description="Place a runtime's host tensor groups (optimizer data, activation "
        "checkpoints, gradients, and with deepspeed-zero3 the bf16 weights) over local DRAM and "
        "CXL nodes and predict forward, backward and step times with the simulator.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"one of {', '.join(MODELS)} or a transformers config.json",
    )
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (default 1)")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    parser.add_argument(
        "--topology",
        help="a declared topology (YAML path or shipped name such as paper-1aic); "
        "default: this machine",
    )
    parser.add_argument(
        "--profile", help="a profile JSON from offload-profile: its measured rates win"
    )
    parser.add_argument("--policy", default="planned", choices=POLICY_NAMES)
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="TIER=SIZE",
        help="bytes a tier may hold, e.g. dram=64GiB, cxl=256GiB (repeat); "
        "a tier not named keeps its nodes' capacity",
    )
    parser.add_argument("--optimizer", default="adam", choices=("adam", "lion"))
    parser.add_argument(
        "--runtime",
        default="ours",
        choices=tuple(RUNTIMES),
        help="ours: what offload.enable runs (params on the GPU, gradients read where they "
        "land, the optimizer stepping during backward, checkpoints and the loss's log-probs "
        "offloaded); deepspeed-zero3: params streamed from the host, fp32 master gradients, "
        "the optimizer after backward, DeepSpeed's per-step overhead (the paper's setting)",
    )
    decode = parser.add_argument_group(
        "decode", "with --decode: place the KV cache of a long-context decode instead"
    )
    decode.add_argument(
        "--decode",
        action="store_true",
        help="plan the KV cache (class kv_cache) of decoding up to --context tokens and predict "
        "the decode step's DMA time (tokens/s bound by DMA); --seq, --optimizer and --runtime "
        "do not apply",
    )
    decode.add_argument(
        "--context", type=int, help="context tokens the cache must hold (with --decode)"
    )
    decode.add_argument(
        "--hbm-layers",
        type=int,
        default=DecodeConfig.hbm_layers,
        help=f"TieredKVCache's device slots (default {DecodeConfig.hbm_layers})",
    )
    decode.add_argument(
        "--block-tokens",
        type=int,
        default=DecodeConfig.block_tokens,
        help=f"tokens per host block (default {DecodeConfig.block_tokens})",
    )
    decode.add_argument(
        "--kv-dtype-bytes",
        type=int,
        default=DecodeConfig.dtype_nbytes,
        help="bytes per K/V element (default 2: bf16)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run_plan_command)


def plan_budgets(items: list[str], topology: Topology) -> dict[str, int]:
    """``--budget`` values (``["dram=64GiB"]``) in bytes; with none, each tier's node capacities.

    >>> from allocators.declared_topology import load_declared
    >>> plan_budgets([], load_declared("paper-2aic"))["cxl"] == 512 << 30
    True
    """
    if items:
        return dict(parse_budget_args(items))
    tiers = topology.tiers
    return {
        "dram": sum(n.total_bytes for n in tiers.local_dram),
        "cxl": sum(n.total_bytes for n in tiers.cxl),
    }


def _group_dict(item) -> dict:
    """One placed item as JSON-ready data, with the paper's group it belongs to."""
    return {
        "name": item.group.name,
        "group": item.group.group_name,
        "nbytes": item.group.nbytes,
        "rule": item.rule,
        "placement": [[node, fraction] for node, fraction in item.placement.shares],
        "nbytes_per_node": {str(n): b for n, b in item.nbytes_per_node.items()},
    }


def _budgets_dict(result) -> dict:
    """The budgets a plan was made within as JSON-ready data: bytes per tier, and the tiers
    not named (given their nodes' capacity)."""
    budgets = result.budgets
    return {
        "budgets_nbytes": dict(budgets.declared),
        "budgets_from_capacity": list(budgets.from_capacity),
    }


def _budget_caption(result) -> str:
    """The budgets a plan was made within, saying which tiers were given their capacity."""
    return f"budgets: {result.budgets.describe()}; a tier not named keeps its nodes' capacity"


def _placement_table(groups, rates: SimRates, title: str, caption: str) -> Table:
    """Items by nodes, in the order the policy placed them: each item's rule, and its bytes and
    share on every node any item uses."""
    nodes = sorted({n for item in groups for n in item.nbytes_per_node})
    table = Table(title=title, caption=caption)
    table.add_column("item", no_wrap=True)
    table.add_column("rule")
    table.add_column("size", justify="right")
    for node in nodes:
        table.add_column(f"node {node} ({rates.kinds.get(node, '?')})", justify="right")
    for item in groups:
        cells = []
        for node in nodes:
            nbytes = item.nbytes_per_node.get(node, 0)
            share = nbytes / item.group.nbytes if item.group.nbytes else 0.0
            cells.append(f"{format_bytes(nbytes)} ({share:.0%})" if nbytes else "-")
        table.add_row(
            item.group.name,
            item.rule,
            format_bytes(item.group.nbytes),
            *cells,
        )
    return wrap_not_cut(table)


def plan_to_dict(result: Plan, rates: SimRates) -> dict:
    """A plan as JSON-ready data: every item the policy placed (``groups``, in the order it
    placed them, each with its paper group, rule, placement and bytes per node), the phases and
    the rate notes."""
    return {
        "policy": result.policy,
        "groups": [_group_dict(item) for item in result.result.groups],
        **_budgets_dict(result.result),
        "predicted_s": predicted_phases(result.prediction),
        "tokens_per_s": result.prediction.tokens_per_s,
        "bottlenecks": result.prediction.bottlenecks,
        "source": "simulated",
        "rate_notes": list(rates.notes),
    }


def print_plan(result: Plan, rates: SimRates, console: Console) -> None:
    """Two rich tables: items by nodes (bytes and share), then the predicted phases."""
    title = f"placement: {result.policy}"
    caption = _budget_caption(result.result)
    console.print(_placement_table(result.result.groups, rates, title, caption))
    phases = Table(title="predicted step (simulated)")
    phases.add_column("phase")
    phases.add_column("seconds", justify="right")
    phases.add_column("bound by")
    for phase, seconds in predicted_phases(result.prediction).items():
        phases.add_row(phase, f"{seconds:.3f}", result.prediction.bottlenecks.get(phase, ""))
    phases.add_row("tokens/s", f"{result.prediction.tokens_per_s:,.0f}", "")
    console.print(wrap_not_cut(phases))
    for note in rates.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def run_plan_command(args: argparse.Namespace) -> int:
    """Run ``offload plan`` for parsed arguments; returns the exit code 0.

    >>> import contextlib, io
    >>> out = io.StringIO()
    >>> ns = argparse.Namespace(model="llama-1.1b", batch=1, seq=2048, topology="paper-1aic",
    ...     profile=None, policy="cxl_aware", budget=["dram=20GiB", "cxl=64GiB"],
    ...     optimizer="adam", runtime="ours", json=True)
    >>> with contextlib.redirect_stdout(out):
    ...     rc = run_plan_command(ns)
    >>> rc, json.loads(out.getvalue())["groups"][0]["rule"]
    (0, 'local')
    """
    if getattr(args, "decode", False):
        return run_decode_plan(args)
    if getattr(args, "context", None) is not None:
        raise PlanError(
            f"--context {args.context} is for a decode plan; add --decode, or give a training "
            "sequence with --seq"
        )
    shape = load_model_shape(args.model)
    topology = load_topology(file=args.topology)
    rates = load_rates(topology, args.profile)
    config = replace(RUNTIMES[args.runtime], optimizer=args.optimizer)
    groups = host_groups(config, shape, args.batch, args.seq)
    return _answer(
        args,
        lambda: plan(
            groups,
            topology.tiers,
            plan_budgets(args.budget, topology),
            args.policy,
            shape=shape,
            batch=args.batch,
            seq=args.seq,
            rates=rates,
            config=config,
        ),
        lambda result: plan_to_dict(result, rates),
        lambda result: print_plan(result, rates, Console()),
    )


def _answer(args, make, to_dict, show) -> int:
    """Run the planner (``make``), turning an allocator's ValueError into a PlanError; print
    the result as JSON with ``--json``, else as tables."""
    try:
        result = make()
    except OffloadError:
        raise
    except ValueError as exc:  # a budget size or tier name the allocators refused
        raise PlanError(str(exc)) from exc
    if args.json:
        sys.stdout.write(json.dumps(to_dict(result), indent=2) + "\n")
    else:
        show(result)
    return 0


def decode_plan_to_dict(result: DecodePlan, rates: SimRates) -> dict:
    """A decode plan as JSON-ready data: the kv_cache placement, bytes per node and the
    predicted decode step (DMA only, so tokens/s is an upper bound)."""
    p = result.prediction
    return {
        "mode": "decode",
        "policy": result.policy,
        "context_tokens": p.context_tokens,
        "batch": p.batch,
        "groups": [_group_dict(item) for item in result.result.groups],
        **_budgets_dict(result.result),
        "decode_step": {
            "step_s": p.step_s,
            "dma_s": p.dma_s,
            "copy_latency_s": p.latency_s,
            "h2d_nbytes": p.h2d_nbytes,
            "d2h_nbytes": p.d2h_nbytes,
            "h2d_copies": p.h2d_copies,
            "d2h_copies": p.d2h_copies,
            "streamed_layers": p.streamed_layers,
            "bottleneck": p.bottleneck,
            "tokens_per_s_dma_bound": p.tokens_per_s,
        },
        "source": "simulated",
        "rate_notes": list(rates.notes),
    }


def print_decode_plan(result: DecodePlan, rates: SimRates, console: Console) -> None:
    """Two rich tables: the kv_cache group by nodes, then the predicted decode step."""
    p = result.prediction
    title = f"KV cache placement: {result.policy} ({p.context_tokens} tokens)"
    console.print(
        _placement_table(result.result.groups, rates, title, _budget_caption(result.result))
    )
    step = Table(title="predicted decode step (simulated, DMA only)")
    step.add_column("quantity")
    step.add_column("value", justify="right")
    step.add_row("H2D per step", f"{p.h2d_nbytes / GIB:.3f} GiB in {p.h2d_copies} copies")
    step.add_row("D2H per step", f"{p.d2h_nbytes / GIB:.3f} GiB in {p.d2h_copies} copies")
    step.add_row("DMA seconds", f"{p.dma_s:.4f} (bound by {p.bottleneck})")
    step.add_row("copy latency seconds", f"{p.latency_s:.4f}")
    step.add_row("step seconds", f"{p.step_s:.4f}")
    step.add_row("tokens/s bound by DMA", f"{p.tokens_per_s:,.2f}")
    console.print(wrap_not_cut(step))
    for note in rates.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


def run_decode_plan(args: argparse.Namespace) -> int:
    """Run ``offload plan --decode`` for parsed arguments; returns the exit code 0.

    >>> import contextlib, io
    >>> out = io.StringIO()
    >>> ns = argparse.Namespace(model="qwen2.5-7b", batch=1, context=131072, decode=True,
    ...     topology="paper-1aic", profile=None, policy="cxl_aware",
    ...     budget=["dram=4GiB", "cxl=64GiB"], hbm_layers=2, block_tokens=1024,
    ...     kv_dtype_bytes=2, json=True)
    >>> with contextlib.redirect_stdout(out):
    ...     rc = run_decode_plan(ns)
    >>> data = json.loads(out.getvalue())
    >>> rc, data["groups"][0]["rule"], data["decode_step"]["bottleneck"]
    (0, 'interleave', 'link h2d')
    """
    if args.context is None:
        raise PlanError("--decode needs --context TOKENS, e.g. --decode --context 131072")
    shape = load_model_shape(args.model)
    topology = load_topology(file=args.topology)
    rates = load_rates(topology, args.profile)

    def make() -> DecodePlan:
        config = DecodeConfig(
            hbm_layers=args.hbm_layers,
            block_tokens=args.block_tokens,
            dtype_nbytes=args.kv_dtype_bytes,
        )
        return plan_decode(
            shape,
            topology.tiers,
            plan_budgets(args.budget, topology),
            args.policy,
            context_tokens=args.context,
            batch=args.batch,
            rates=rates,
            config=config,
        )

    return _answer(
        args,
        make,
        lambda result: decode_plan_to_dict(result, rates),
        lambda result: print_decode_plan(result, rates, Console()),
    )
