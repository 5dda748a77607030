"""Experiment: phase ablation. Start from everything on local DRAM and move one host group at a
time wholly to CXL (striped over the cards), to see which phase each group's tier slows.

Simulated on the paper's declared machines with the paper's runtime (DeepSpeed ZeRO-3). Measuring
it needs a GPU and CXL nodes: on such a machine run exp_end_to_end with ``--report`` for each
placement; this machine has neither, so only simulated rows are written.

    .venv/bin/python experiments/exp_phase_ablation.py
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.declared_topology import load_declared
from allocators.placement import as_placement, interleave
from experiments.common.paper_setup import PAPER_MODELS, PAPER_SWEEP, PAPER_TOPOLOGIES, paper_groups
from experiments.common.results_io import SIMULATED_DIR, write_results
from offload.planning.model_shapes import MODELS
from offload.planning.simulator.rates import sim_rates
from offload.planning.simulator.step import DEEPSPEED_ZERO3, simulate_step


def simulated_rows(models: Sequence[str] = PAPER_MODELS) -> list[dict]:
    """One row per (model, cards, batch, seq, group moved), with phase times and the slowdown.

    >>> rows = simulated_rows(["qwen2.5-7b"])
    >>> worst = max(rows, key=lambda r: r["slowdown"])
    >>> worst["moved"], worst["cards"]
    ('latency_critical', 1)
    """
    rows = []
    for cards, topo_name in PAPER_TOPOLOGIES.items():
        topology = load_declared(topo_name)
        rates = sim_rates(topology)
        local = as_placement(topology.tiers.local_dram[0].id)
        cxl = interleave([n.id for n in topology.tiers.cxl])
        for model in models:
            for batch, seq in PAPER_SWEEP:
                groups = paper_groups(model, batch, seq)
                baseline = None
                # Whole groups move: the items of one (the optimizer's four) go together.
                for moved in (None, *dict.fromkeys(g.group_name for g in groups)):
                    by_class = {
                        cls: cxl if g.group_name == moved else local
                        for g in groups
                        for cls in g.tensor_classes
                    }
                    pred = simulate_step(
                        MODELS[model], batch, seq, by_class, rates, DEEPSPEED_ZERO3
                    )
                    baseline = baseline or pred.total_s
                    rows.append(
                        {
                            "source": "simulated",
                            "machine": topo_name,
                            "model": model,
                            "cards": cards,
                            "batch": batch,
                            "seq": seq,
                            "moved": moved or "none",
                            "forward_s": pred.forward_s,
                            "backward_s": pred.backward_s,
                            "step_s": pred.step_s,
                            "total_s": pred.total_s,
                            "slowdown": pred.total_s / baseline,
                        }
                    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``phase_ablation.csv`` and print the slowdown per moved group."""
    frame = write_results(simulated_rows(), SIMULATED_DIR / "phase_ablation.csv")
    print(frame.pivot_table(index=["cards", "moved"], values="slowdown", aggfunc="max").round(3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
