"""Experiment: fine-tuning throughput by strategy (local_only, naive_interleave, cxl_aware,
planned) x (1 or 2 CXL cards) x the paper's (micro-batch, sequence) sweep, for both of its models.

Simulated on the paper's declared machines (allocators/topologies/paper-{1,2}aic.yaml) with the
paper's runtime (DeepSpeed ZeRO-3: bf16 params streamed from the host, fp32 master gradients, the
optimizer after backward, DeepSpeed's per-step overhead) and with ours (offload.planning.runtime_step: what
offload.enable runs in the paper's activation mode; params stay on the GPU, gradients are read
where they land, the optimizer steps during backward), each over the host groups it allocates.
Budgets, one machine for both runtimes (local_only gets what each runtime needs): ``paper``
(experiments.common.paper_setup: local DRAM capped at the paper's 18P + half the checkpoints) and
``14P`` (local DRAM of 14 bytes per parameter, less than the paper's 16P of optimizer data, so its
greedy, visiting the items one by one, keeps three of them local and splits the fourth).
``--merged`` prints what the policies gave when the four optimizer items were placed as one
group (this project's version before issue 17), beside what they give item by item.
Measured rows come from real runs: ``--report CSV`` takes the per-step report of a run of
offload.enable (columns forward_ms, backward_ms, optimizer_ms; steps after the first two are
averaged, as in the paper) for the model, batch, seq, strategy and cards given; this machine has
no GPU or CXL, so none are committed from here.

    .venv/bin/python experiments/exp_end_to_end.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.declared_topology import load_declared
from allocators.policies import POLICY_NAMES
from experiments.common.paper_setup import (
    PAPER_MODELS,
    PAPER_SWEEP,
    PAPER_TOPOLOGIES,
    local_only_budgets,
    paper_budgets,
    paper_groups,
)
from experiments.common.results_io import RESULTS_DIR, SIMULATED_DIR, this_machine, write_results
from offload.planning.host_groups import merged_groups
from offload.planning.model_shapes import MODELS
from offload.planning.planner import plan
from offload.planning.runtime_step import OUR_RUNTIME, host_groups
from offload.planning.simulator.rates import sim_rates
from offload.planning.simulator.step import DEEPSPEED_ZERO3

RUNTIMES = {"deepspeed-zero3": DEEPSPEED_ZERO3, "ours": OUR_RUNTIME}
CXL_CARD_NBYTES = 256 << 30  # the declared card capacity
BUDGETS = ("paper", "14P")


def capped_budgets(budget: str, model: str, batch: int, seq: int, cards: int) -> dict[str, int]:
    """The CXL runs' budgets of case ``budget`` (see the module docstring), the same machine for
    both runtimes.

    >>> capped_budgets("14P", "qwen2.5-7b", 1, 4096, 1)["dram"] == 14 * MODELS["qwen2.5-7b"].n_params
    True
    """
    cxl = cards * CXL_CARD_NBYTES
    if budget == "14P":
        return {"dram": 14 * MODELS[model].n_params, "cxl": cxl}
    return paper_budgets(paper_groups(model, batch, seq), cxl)


def simulated_rows(models: Sequence[str] = PAPER_MODELS, *, merged: bool = False) -> list[dict]:
    """One row per (budget, runtime, model, cards, batch, seq, strategy), with tokens/s relative
    to local_only of the same runtime, model and (batch, seq). ``merged``: the policies place
    each paper group as one item (the optimizer's four together), as before issue 17.

    >>> rows = simulated_rows(["qwen2.5-7b"])
    >>> min(r["vs_local_only"] for r in rows if r["strategy"] == "naive_interleave") < 0.8
    True
    """
    rows = []
    for budget, (cards, topo_name) in ((b, t) for b in BUDGETS for t in PAPER_TOPOLOGIES.items()):
        topology = load_declared(topo_name)
        rates = sim_rates(topology)
        for runtime, config in RUNTIMES.items():
            for model in models:
                for batch, seq in PAPER_SWEEP:
                    groups = host_groups(config, MODELS[model], batch, seq)
                    if merged:
                        groups = merged_groups(groups)
                    capped = capped_budgets(budget, model, batch, seq, cards)
                    reference = None
                    for strategy in POLICY_NAMES:
                        budgets = local_only_budgets(groups) if strategy == "local_only" else capped
                        result = plan(
                            groups,
                            topology.tiers,
                            budgets,
                            strategy,
                            shape=MODELS[model],
                            batch=batch,
                            seq=seq,
                            rates=rates,
                            config=config,
                        )
                        pred = result.prediction
                        reference = reference or pred.tokens_per_s
                        rows.append(
                            {
                                "source": "simulated",
                                "machine": topo_name,
                                "budget": budget,
                                "runtime": runtime,
                                "model": model,
                                "cards": cards,
                                "batch": batch,
                                "seq": seq,
                                "strategy": strategy,
                                "forward_s": pred.forward_s,
                                "backward_s": pred.backward_s,
                                "step_s": pred.step_s,
                                "overhead_s": pred.overhead_s,
                                "total_s": pred.total_s,
                                "tokens_per_s": pred.tokens_per_s,
                                "vs_local_only": pred.tokens_per_s / reference,
                                "bound_backward": pred.bottlenecks["backward"],
                                "bound_step": pred.bottlenecks["step"],
                                "placement": "; ".join(
                                    f"{name}={p}" for name, p in result.placements.items()
                                ),
                            }
                        )
    return rows


def measured_row(report: str, model: str, batch: int, seq: int, strategy: str, cards: int) -> dict:
    """Average a runtime step report (skipping the first two steps, as the paper does).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "r.csv")
    >>> pd.DataFrame({"forward_ms": [9, 9, 1e3, 1e3], "backward_ms": [9, 9, 2e3, 2e3],
    ...               "optimizer_ms": [9, 9, 1e3, 1e3]}).to_csv(path, index=False)
    >>> float(measured_row(path, "llama-1.1b", 1, 4000, "local_only", 0)["tokens_per_s"])
    1000.0
    """
    frame = pd.read_csv(report).iloc[2:]
    forward, backward, step = (
        frame[c].mean() / 1e3 for c in ("forward_ms", "backward_ms", "optimizer_ms")
    )
    total = forward + backward + step
    return {
        "source": "measured",
        "machine": this_machine(),
        "runtime": "ours",
        "model": model,
        "cards": cards,
        "batch": batch,
        "seq": seq,
        "strategy": strategy,
        "forward_s": forward,
        "backward_s": backward,
        "step_s": step,
        "total_s": total,
        "tokens_per_s": batch * seq / total,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``end_to_end.csv``; with ``--report``, also the measured row for that run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", help="a runtime per-step report CSV of a real run")
    parser.add_argument("--model", default="qwen2.5-7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--strategy", default="local_only", choices=POLICY_NAMES)
    parser.add_argument("--cards", type=int, default=0)
    parser.add_argument(
        "--merged",
        action="store_true",
        help="also print the figures with each paper group placed as one item (before issue 17)",
    )
    args = parser.parse_args(argv)
    frame = write_results(simulated_rows(), SIMULATED_DIR / "end_to_end.csv")
    if args.report:
        row = measured_row(args.report, args.model, args.batch, args.seq, args.strategy, args.cards)
        write_results([row], RESULTS_DIR / this_machine() / "end_to_end.csv")
    index = ["budget", "runtime", "cards", "strategy"]
    summary = frame.pivot_table(index=index, values="vs_local_only", aggfunc=["min", "max"])
    if args.merged:
        old = pd.DataFrame(simulated_rows(merged=True))
        summary = pd.concat(
            {
                "items": summary,
                "merged": old.pivot_table(
                    index=index, values="vs_local_only", aggfunc=["min", "max"]
                ),
            },
            axis=1,
        )
    print(summary.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
