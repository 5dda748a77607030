"""Experiment: striping over 1 vs 2 CXL cards, with and without local DRAM in the stripe: DMA
rates each way (2 GiB copies, one GPU) and the CPU AdamW rate, on the paper's 2-AIC machine.

Measured where the hardware is: the DMA rows via exp_dma_sweep's timing on every stripe whose
nodes exist here (needs CUDA). Simulated rows always.

    .venv/bin/python experiments/exp_striping.py
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.declared_topology import load_declared
from allocators.placement import Placement, interleave
from experiments.common.paper_setup import PAPER_TOPOLOGIES
from experiments.common.results_io import SIMULATED_DIR, write_results
from offload.planning.simulator.rates import ADAMW_NBYTES_PER_ELEMENT, GIB, sim_rates
from offload.planning.simulator.traffic import Traffic, copy_seconds, memory_seconds

STRIPES: dict[str, Placement] = {
    "1 card": interleave([1]),
    "2 cards": interleave([1, 2]),
    "dram + 1 card": interleave([0, 1]),
    "dram + 2 cards": interleave([0, 1, 2]),
    "dram only": interleave([0]),
}
NBYTES = 2 * GIB


def simulated_rows(topology: str = PAPER_TOPOLOGIES[2]) -> list[dict]:
    """One row per stripe: H2D and D2H GiB/s and CPU AdamW G elements/s.

    >>> rows = {r["stripe"]: r for r in simulated_rows()}
    >>> rows["2 cards"]["d2h_gib_per_s"] > rows["1 card"]["d2h_gib_per_s"]
    True
    """
    rates = sim_rates(load_declared(topology))
    rows = []
    for name, placement in STRIPES.items():
        cpu = Traffic()
        cpu.add("cpu", NBYTES, placement)
        cpu_s = memory_seconds(cpu, rates).seconds
        rows.append(
            {
                "source": "simulated",
                "machine": topology,
                "stripe": name,
                "placement": str(placement),
                "h2d_gib_per_s": NBYTES / copy_seconds(NBYTES, placement, "h2d", rates) / GIB,
                "d2h_gib_per_s": NBYTES / copy_seconds(NBYTES, placement, "d2h", rates) / GIB,
                "adamw_g_elements_per_s": NBYTES / ADAMW_NBYTES_PER_ELEMENT / cpu_s / 1e9,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``striping.csv`` and print it."""
    frame = write_results(simulated_rows(), SIMULATED_DIR / "striping.csv")
    print(frame.drop(columns=["source", "machine"]).round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
