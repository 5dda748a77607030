"""Experiment: one CPU AdamW step (fp32 state) by tensor size and by where its data lives (local
DRAM, CXL, DRAM:CXL 1:1), against the paper's table (reference/PAPER.md).

Measured where the hardware is: torch's fused CPU AdamW on every placement whose NUMA nodes exist
here, its state in HostBuffers bound to those nodes (on a one-node machine: local DRAM only).
Simulated on the paper's 1-AIC machine: 28 bytes per element over the placement's nodes, the
slowest node bounding a striped tensor (offload.planning.simulator.traffic). The simulator streams every
tensor from memory, as a training step does; the paper's microbenchmark steps one tensor again and
again, so its small tensors stay in cache, which the simulator does not model (see the README).

    .venv/bin/python experiments/exp_cpu_optimizer.py --machine cpu-2core
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.declared_topology import load_declared
from allocators.placement import Placement, as_placement
from experiments.common.paper_setup import PAPER_TOPOLOGIES
from experiments.common.results_io import RESULTS_DIR, SIMULATED_DIR, this_machine, write_results
from offload.planning.simulator.rates import ADAMW_NBYTES_PER_ELEMENT, sim_rates
from offload.planning.simulator.traffic import Traffic, memory_seconds

# reference/PAPER.md: elements -> (local ms, CXL ms).
PAPER_MS = {
    1_840_000: (0.171, 0.184),
    12_800_000: (0.806, 0.918),
    20_970_000: (1.54, 4.22),
    67_900_000: (6.31, 23.75),
    545_000_000: (54.8, 228.8),
    671_000_000: (67.6, 273.3),
}
PLACEMENTS: dict[str, Placement] = {
    "dram": as_placement(0),
    "cxl": as_placement(1),
    "dram:cxl 1:1": as_placement([(0, 1), (1, 1)]),
}
# The measured sizes stop where fp32 state would crowd a small shared machine (67.9M: 1.1 GiB).
MEASURED_MAX_ELEMENTS = 70_000_000


def simulated_rows(topology: str = PAPER_TOPOLOGIES[1]) -> list[dict]:
    """Simulated step time per (size, placement), with the paper's figure where it has one.

    >>> rows = simulated_rows()
    >>> big = [r for r in rows if r["elements"] == 545_000_000]
    >>> round(big[1]["ms"] / big[0]["ms"], 2)  # CXL against local
    4.18
    """
    rates = sim_rates(load_declared(topology))
    rows = []
    for elements, (paper_local, paper_cxl) in PAPER_MS.items():
        for name, placement in PLACEMENTS.items():
            traffic = Traffic()
            traffic.add("cpu", elements * ADAMW_NBYTES_PER_ELEMENT, placement)
            paper = {"dram": paper_local, "cxl": paper_cxl}.get(name)
            rows.append(
                {
                    "source": "simulated",
                    "machine": topology,
                    "elements": elements,
                    "placement": name,
                    "ms": memory_seconds(traffic, rates).seconds * 1e3,
                    "paper_ms": paper,
                }
            )
    return rows


def _adamw_ms(elements: int, node: int, repeats: int) -> float:
    import torch

    from allocators.host_buffer import HostBuffer

    buffers = [HostBuffer(elements * 4, placement=node, pin=False) for _ in range(4)]
    try:
        param, grad, exp_avg, exp_avg_sq = (b.tensor(torch.float32, elements) for b in buffers)
        for t in (param, exp_avg, exp_avg_sq):
            t.zero_()
        grad.fill_(1e-3)
        weight = torch.nn.Parameter(param, requires_grad=True)
        weight.grad = grad
        optimizer = torch.optim.AdamW([weight], lr=1e-3, fused=True)
        # The moments live in the placed buffers too, not where torch would allocate them.
        optimizer.state[weight] = {
            "step": torch.tensor(0.0),
            "exp_avg": exp_avg,
            "exp_avg_sq": exp_avg_sq,
        }
        optimizer.step()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            best = min(best, time.perf_counter() - start)
        del optimizer, weight, param, grad, exp_avg, exp_avg_sq
        return best * 1e3
    finally:
        for b in buffers:
            b.free(force=True)


def measured_rows(machine: str, repeats: int = 5) -> list[dict]:
    """Time torch's fused CPU AdamW on every node of this machine that the paper's placements
    name (node 0 is local DRAM; a CXL node must be node 1 to match the paper's labels)."""
    from allocators.sysfs_topology import discover

    topo = discover()
    rows = []
    for name, placement in PLACEMENTS.items():
        if len(placement.nodes) != 1 or placement.nodes[0] not in topo.node_ids:
            continue
        for elements in PAPER_MS:
            if elements > MEASURED_MAX_ELEMENTS:
                continue
            rows.append(
                {
                    "source": "measured",
                    "machine": machine,
                    "elements": elements,
                    "placement": name,
                    "ms": _adamw_ms(elements, placement.nodes[0], repeats),
                    "paper_ms": None,
                }
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``cpu_optimizer.csv`` (simulated, and measured under ``--machine``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default=this_machine(), help="name for this machine's rows")
    parser.add_argument("--no-measure", action="store_true", help="simulate only")
    args = parser.parse_args(argv)
    write_results(simulated_rows(), SIMULATED_DIR / "cpu_optimizer.csv")
    measured = [] if args.no_measure else measured_rows(args.machine)
    if measured:
        write_results(measured, RESULTS_DIR / args.machine / "cpu_optimizer.csv")
        for row in measured:
            print(f"{row['placement']:>6} {row['elements']:>12,} elements {row['ms']:9.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
