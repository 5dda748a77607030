"""Experiment: host<->GPU DMA bandwidth by copy size, host placement (DRAM, CXL, DRAM:CXL 1:1 ...
1:4), direction and concurrency (1 or 2 GPUs sharing the host), as in reference/PAPER.md.

Measured where the hardware is: with CUDA, every placement whose NUMA nodes exist on this machine
is timed for real (HostBuffer placed and pinned, cudaMemcpyAsync via ``copy_``, CUDA events);
two-GPU rows need two GPUs. Everything is also simulated on the paper's 1-AIC machine
(offload.planning.simulator.traffic.copy_seconds). Rows: ``source`` measured/simulated, ``machine``.

    .venv/bin/python experiments/exp_dma_sweep.py            # simulated (+ measured with CUDA)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if not __package__:  # run as a script (python experiments/x.py): the repo root holds experiments/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocators.declared_topology import load_declared
from allocators.placement import Placement, as_placement
from experiments.common.paper_setup import PAPER_TOPOLOGIES
from experiments.common.results_io import RESULTS_DIR, SIMULATED_DIR, this_machine, write_results
from offload.planning.simulator.rates import GIB, sim_rates
from offload.planning.simulator.traffic import copy_seconds

SIZES = (*(1 << k for k in range(12, 31, 2)), 2 * GIB)  # 4 KiB, 16 KiB ... 1 GiB, 2 GiB
# DRAM:CXL weights on the paper's machine (node 0 DRAM, node 1 the card).
MIXES: dict[str, Placement] = {
    "dram": as_placement(0),
    "cxl": as_placement(1),
    "dram:cxl 1:1": as_placement([(0, 1), (1, 1)]),
    "dram:cxl 1:2": as_placement([(0, 1), (1, 2)]),
    "dram:cxl 1:3": as_placement([(0, 1), (1, 3)]),
    "dram:cxl 1:4": as_placement([(0, 1), (1, 4)]),
}


def simulated_rows(topology: str = PAPER_TOPOLOGIES[1]) -> list[dict]:
    """Every (size, mix, direction, gpus) simulated on a declared machine.

    >>> rows = simulated_rows()
    >>> row = [r for r in rows if r["mix"] == "cxl" and r["direction"] == "d2h"
    ...        and r["nbytes"] == 2 * GIB and r["gpus"] == 1][0]
    >>> round(row["gib_per_s"], 1)
    34.7
    """
    rates = sim_rates(load_declared(topology))
    rows = []
    for mix, placement in MIXES.items():
        for direction in ("h2d", "d2h"):
            for gpus in (1, 2):
                for nbytes in SIZES:
                    seconds = copy_seconds(nbytes, placement, direction, rates, gpus)
                    rows.append(
                        {
                            "source": "simulated",
                            "machine": topology,
                            "mix": mix,
                            "placement": str(placement),
                            "direction": direction,
                            "gpus": gpus,
                            "nbytes": nbytes,
                            "gib_per_s": nbytes / seconds / GIB,
                        }
                    )
    return rows


def measured_rows(repeats: int = 5) -> list[dict]:  # pragma: no cover - needs CUDA
    """Time real copies for every mix whose nodes exist here (one GPU per concurrent stream)."""
    import torch

    from allocators.host_buffer import HostBuffer
    from allocators.sysfs_topology import discover

    if not torch.cuda.is_available():
        return []
    nodes = set(discover().node_ids)
    machine = this_machine()
    rows = []
    for mix, placement in MIXES.items():
        if not set(placement.nodes) <= nodes:
            continue
        for gpus in range(1, min(2, torch.cuda.device_count()) + 1):
            for nbytes in SIZES:
                with HostBuffer(nbytes, placement=placement, pin=True) as buf:
                    host = buf.tensor(torch.uint8, nbytes)
                    devs = [
                        torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{g}")
                        for g in range(gpus)
                    ]
                    for direction in ("h2d", "d2h"):
                        best = float("inf")
                        for _ in range(repeats):
                            starts = [torch.cuda.Event(enable_timing=True) for _ in devs]
                            ends = [torch.cuda.Event(enable_timing=True) for _ in devs]
                            for g, dev in enumerate(devs):
                                with torch.cuda.device(g):
                                    starts[g].record()
                                    if direction == "h2d":
                                        dev.copy_(host, non_blocking=True)
                                    else:
                                        host.copy_(dev, non_blocking=True)
                                    ends[g].record()
                            torch.cuda.synchronize()
                            best = min(
                                best,
                                max(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)),
                            )
                        rows.append(
                            {
                                "source": "measured",
                                "machine": machine,
                                "mix": mix,
                                "placement": str(placement),
                                "direction": direction,
                                "gpus": gpus,
                                "nbytes": nbytes,
                                "gib_per_s": nbytes / (best / 1e3) / GIB,
                            }
                        )
                    del devs, host
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``dma_sweep.csv`` (simulated under paper-simulated/, measured under this machine)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-measure", action="store_true", help="simulate only")
    args = parser.parse_args(argv)
    write_results(simulated_rows(), SIMULATED_DIR / "dma_sweep.csv")
    measured = [] if args.no_measure else measured_rows()
    if measured:
        write_results(measured, RESULTS_DIR / this_machine() / "dma_sweep.csv")
    print(f"dma sweep: simulated rows written; measured rows: {len(measured)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
