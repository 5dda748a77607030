"""The optimizer, contention and pinning measurements on small sizes: the rows they produce and
how they are labelled (real work, small enough to stay fast; no timing assertions)."""

import math

import pytest

from allocators.placement import as_placement
from profilers.contention_sweep import ContentionConfig, measure_contention
from profilers.optimizer_step import OptimizerConfig, measure_optimizer
from profilers.pinning_cost import PinningConfig, measure_pinning
from profilers.placement_sweep import sweep_placements
from profilers.profile_rates import node_rates
from profilers.result_row import placement_label

MIB = 1 << 20


def test_optimizer_rows_per_kernel_with_placed_state():
    config = OptimizerConfig(
        placements=(as_placement(0),), cpu_node=0, threads=1, elements=(1 << 18,)
    )
    rows = list(measure_optimizer(config))
    assert [r.kernel.split(":")[0] for r in rows] == ["optim_cpu", "torch-fused"]
    assert all(r.unit == "ms" and r.elements == 1 << 18 and r.median > 0 for r in rows)
    assert node_rates(rows)[0].adamw_elements_per_s > 0


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        OptimizerConfig(placements=(as_placement(0),), cpu_node=0, threads=1, optimizers=("sgd",))


def test_contention_without_gpu_labels_the_copy_thread_emulated():
    config = ContentionConfig(node=0, cpus=(0, 1), elements=1 << 18, copy_nbytes=4 * MIB, gpu=False)
    rows = list(measure_contention(config))
    assert [r.case for r in rows] == [
        "adamw idle",
        "emulated dma idle",
        "adamw + emulated dma",
        "emulated dma + adamw",
    ]
    assert [r.emulated for r in rows] == [False, True, True, True]
    assert all(math.isfinite(r.median) and r.median > 0 for r in rows)
    assert "meanwhile" in rows[2].note and "meanwhile" in rows[3].note


def test_pinning_without_cuda_times_allocation_only():
    rows = list(
        measure_pinning(PinningConfig(nodes=(0,), nbytes=8 * MIB, cuda=False, page_sizes=("4KiB",)))
    )
    assert [(r.case, r.unit) for r in rows] == [("allocate+prefault", "s/GiB")]
    assert rows[0].median > 0


def test_cxl_machine_sweeps_each_node_then_local_cxl_mixes():
    from pathlib import Path

    from allocators.sysfs_topology import discover

    topo = discover(Path(__file__).parent / "fixtures/sysfs/one-socket-one-cxl")
    labels = [placement_label(p) for p in sweep_placements(topo, [0, 1])]
    assert labels == ["node0", "node1", "node0:1+node1:1", "node0:1+node1:2", "node0:1+node1:4"]
