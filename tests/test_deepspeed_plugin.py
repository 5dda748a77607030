"""offload.deepspeed: per-rank plans, the version gate, and upstream DeepSpeed ZeRO offload on CPU
(gloo, DeepSpeed's CPU accelerator) with its host buffers placed by our allocator.

The DeepSpeed runs happen in child processes (this file is also their worker), so torch.distributed
and DeepSpeed's accelerator choice never leak into the rest of the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from two_sockets import two_sockets_two_cxl

from allocators.errors import BudgetExceededError, ConfigError
from offload.deepspeed.call_sites import check_version
from offload.deepspeed.engine import pinned_offload_config
from offload.deepspeed.rank_plan import local_rank_and_size, plan_rank, split_budgets

GIB = 1 << 30
STEPS = 10
GRAD_ACCUMULATION = 2  # so ZeRO-2 makes its CPU gradient accumulation buffers in a backward


def test_each_rank_places_on_the_numa_node_of_its_gpu():
    for rank in (0, 1):
        plan = plan_rank(
            two_sockets_two_cxl(),
            "cxl_aware",
            {"dram": "32GiB", "cxl": "64GiB"},
            n_params=10**8,
            hidden=1024,
            layers=8,
            tokens=4096,
            dp_world_size=2,
            local_rank=rank,
            local_world_size=2,
        )
        assert plan.placements["master_params"].nodes == (rank,)
        assert plan.placements["optimizer_state"].nodes == (rank,)


def test_a_rank_spills_to_the_cxl_device_nearest_its_gpu():
    # 2 GB of DRAM per rank holds 1.6 GB of CPU-touched state, 0.2 GB of bf16 params and the
    # checkpoints; the bf16 gradients, last in priority, are interleaved onto CXL.
    plan = plan_rank(
        two_sockets_two_cxl(),
        "cxl_aware",
        {"dram": "4GB", "cxl": "64GiB"},
        n_params=2 * 10**8,
        hidden=1024,
        layers=8,
        tokens=4096,
        dp_world_size=2,
        local_rank=1,
        local_world_size=2,
    )
    assert plan.placements["grads"].nodes == (1, 3)
    assert plan.budgets_nbytes["cxl"] == {3: 32 * GIB}


def test_budgets_are_split_between_the_ranks_of_a_machine():
    assert split_budgets({"dram": "64GiB", "cxl": "128GiB"}, 4) == {
        "dram": 16 * GIB,
        "cxl": 32 * GIB,
    }


def test_a_rank_plan_is_refused_when_its_share_of_dram_is_too_small():
    with pytest.raises(BudgetExceededError, match="dram"):
        plan_rank(
            two_sockets_two_cxl(),
            "local_only",
            {"dram": "1GiB"},
            n_params=10**9,
            hidden=1024,
            layers=8,
            tokens=4096,
            local_world_size=8,
        )


def test_an_unknown_policy_is_refused_per_rank_with_the_alternatives():
    with pytest.raises(ConfigError, match="planned"):
        plan_rank(
            two_sockets_two_cxl(),
            "fastest",
            {"dram": "64GiB"},
            n_params=1000,
            hidden=8,
            layers=1,
            tokens=16,
        )


def test_a_profile_is_refused_unless_the_policy_is_planned():
    pytest.importorskip("deepspeed")
    from torch import nn

    import offload.deepspeed as ods

    with pytest.raises(ConfigError, match="policy='planned'"):
        ods.enable(
            nn.Linear(2, 2),
            config={"zero_optimization": {"stage": 2}},
            policy="cxl_aware",
            profile="machine.json",
            topology=two_sockets_two_cxl(),
            local_rank=0,
            local_world_size=1,
        )


def test_local_rank_beyond_local_size_is_refused():
    with pytest.raises(ConfigError, match="LOCAL_SIZE"):
        local_rank_and_size({"LOCAL_RANK": "2", "LOCAL_SIZE": "2"})


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0"])
def test_unsupported_deepspeed_versions_fail_clearly(version):
    with pytest.raises(ConfigError, match=r"supported.*0\.19\.x"):
        check_version(version)


def test_offload_configs_are_made_to_pin_without_touching_the_callers_dict():
    config = {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "pin_memory": False},
            "offload_param": {"device": "nvme"},
        }
    }
    pinned = pinned_offload_config(config)["zero_optimization"]
    assert pinned["offload_optimizer"]["pin_memory"] is True
    assert "pin_memory" not in pinned["offload_param"]
    assert config["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_the_hook_is_active_only_inside_the_context_and_unknown_pins_go_the_stock_way():
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.utils import pin_memory as ds_pin_memory

    from allocators.tiered import TieredAllocator
    from offload.deepspeed.buffer_placement import DeepSpeedPlacement

    stock_lookup = ds_pin_memory.get_active_native_pinned_memory
    stock_create = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions
    allocator = TieredAllocator(two_sockets_two_cxl(), {"dram": "1GiB"}, pin=False)
    with DeepSpeedPlacement(allocator) as placement:
        assert ds_pin_memory.get_active_native_pinned_memory() is placement
        tensor = torch.ones(4)
        assert placement.pin(tensor) is not None
    assert ds_pin_memory.get_active_native_pinned_memory is stock_lookup
    assert DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions is stock_create
    assert placement.placed == [] and placement.unplaced_nbytes_by_class() == {"unknown": 16}
    placement.close()


def test_an_attached_engine_routes_only_its_own_calls_until_close():
    pytest.importorskip("deepspeed")
    from deepspeed.utils import pin_memory as ds_pin_memory

    from allocators.tiered import TieredAllocator
    from offload.deepspeed.buffer_placement import DeepSpeedPlacement

    class FakeEngine:
        def forward(self):
            return ds_pin_memory.get_active_native_pinned_memory()

        backward = step = forward

    stock_lookup = ds_pin_memory.get_active_native_pinned_memory
    engine = FakeEngine()
    placement = DeepSpeedPlacement(
        TieredAllocator(two_sockets_two_cxl(), {"dram": "1GiB"}, pin=False)
    )
    placement.attach(engine)
    assert engine.step() is placement and engine.backward() is placement
    assert ds_pin_memory.get_active_native_pinned_memory() is stock_lookup()
    assert FakeEngine().step() is stock_lookup()
    placement.close()
    assert ds_pin_memory.get_active_native_pinned_memory is stock_lookup
    assert engine.step() is stock_lookup() and "step" not in vars(engine)


# --- DeepSpeed ZeRO offload on CPU, in child processes ------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(tmp_path: Path, stage: int, world_size: int) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            DS_ACCELERATOR="cpu",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
        )
        out = tmp_path / f"rank{rank}.json"
        cmd = [sys.executable, __file__, "--stage", str(stage), "--out", str(out)]
        procs.append(
            (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT), out)
        )
    results = []
    for proc, out in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log.decode(errors="replace")[-4000:]
        results.append(json.loads(out.read_text()))
    return results


@pytest.fixture(scope="module")
def zero2_one_rank(tmp_path_factory) -> dict:
    pytest.importorskip("deepspeed")
    return _run_ranks(tmp_path_factory.mktemp("zero2"), stage=2, world_size=1)[0]


def test_zero2_offload_gives_the_same_losses_with_our_placement(zero2_one_rank):
    assert len(zero2_one_rank["stock"]) == STEPS * GRAD_ACCUMULATION
    assert zero2_one_rank["patched"] == zero2_one_rank["stock"]


def test_zero2_offload_buffers_are_ours_and_accounted_per_class(zero2_one_rank):
    by_class = zero2_one_rank["placed_nbytes_by_class"]
    n_params = zero2_one_rank["n_params"]
    assert by_class["master_params"] >= 4 * n_params
    assert by_class["master_grads"] >= 4 * n_params
    assert by_class["optimizer_state"] >= 8 * n_params
    assert by_class["params"] > 0
    assert zero2_one_rank["unplaced"] == {}
    charged = zero2_one_rank["dram_node0_by_class"]
    assert all(charged[cls] >= nbytes for cls, nbytes in by_class.items())


def test_zero2_gradient_accumulation_buffers_made_in_the_first_backward_are_ours(zero2_one_rank):
    # One fp32 buffer per parameter (gradient_accumulation_steps=2), besides the staging buffer.
    grads = zero2_one_rank["placed_by_site"]["stage_1_and_2.py:buffer_to_accumulate_to_in_cpu"]
    assert grads == 4 * zero2_one_rank["n_params"]


def test_close_warns_while_a_tensor_of_the_engine_is_kept_then_frees_everything(zero2_one_rank):
    # The caller still holds the model, its last loss and one fp32 master partition (and so
    # that partition's gradient): only those two buffers stay.
    kept = zero2_one_rank["close_with_a_kept_tensor"]
    assert kept["warnings"] == 1 and kept["used_nbytes"] > 0
    assert kept["busy_classes"] == ["master_grads", "master_params"]
    assert kept["after_drop_used_nbytes"] == 0 and kept["after_drop_unfreed_buffers"] == 0


def test_zero2_offload_buffers_sit_on_the_planned_node(zero2_one_rank):
    assert zero2_one_rank["pages_per_node"] and set(zero2_one_rank["pages_per_node"]) == {"0"}


def test_checkpoint_offload_under_a_planned_deepspeed_engine_keeps_the_losses(zero2_one_rank):
    assert zero2_one_rank["planned_policy"] == "planned"
    assert zero2_one_rank["activations_offloaded"] > 0
    assert zero2_one_rank["activation_offload_losses"] == zero2_one_rank["stock"]


@pytest.mark.slow
def test_zero3_param_and_optimizer_offload_gives_the_same_losses_with_our_placement(tmp_path):
    pytest.importorskip("deepspeed")
    result = _run_ranks(tmp_path, stage=3, world_size=1)[0]
    assert result["patched"] == result["stock"]
    placed = {"params", "master_params", "master_grads", "optimizer_state"}
    assert placed <= set(result["placed_nbytes_by_class"])
    assert result["unplaced"] == {}
    # With the model and the last loss kept, close() frees all but the model's own parameter
    # partitions (and warns); once both are dropped, a second close() unmaps the rest.
    closing = result["close_with_the_model_kept"]
    assert closing["warnings"] == 1 and closing["busy_classes"] == ["params"]
    assert closing["after_drop_used_nbytes"] == 0 and closing["after_drop_unfreed_buffers"] == 0


@pytest.mark.slow
def test_two_ranks_on_one_machine_split_the_budget_and_match_stock(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = _run_ranks(tmp_path, stage=2, world_size=2)
    for result in ranks:
        assert result["patched"] == result["stock"]
        assert result["rank_budget_nbytes"] == WORKER_DRAM_BUDGET_NBYTES // 2
        assert result["placed_nbytes_by_class"]["master_params"] >= 4 * result["n_params"] // 2


# --- the worker: stock DeepSpeed, then the same run under offload.deepspeed.enable ------------

WORKER_DRAM_BUDGET_NBYTES = GIB


def _train(engine, rank: int, keep: list | None = None) -> list[float]:
    """Losses of every micro-batch; ``keep`` gets the last loss tensor, as a script keeps it."""
    import torch

    generator = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(STEPS * GRAD_ACCUMULATION):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if keep is not None:
        keep.append(loss)
    return losses


def _worker(stage: int, out: Path) -> None:
    import deepspeed

    import offload.deepspeed as ods
    from allocators.sysfs_topology import discover
    from offload.deepspeed.release import forget_engine
    from offload.tools.tiny_finetune import tiny_llama

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GRAD_ACCUMULATION,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "steps_per_print": 10**6,
    }
    if stage == 3:
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    rank = int(os.environ["RANK"])
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    n_params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, config=ods.pinned_offload_config(config))
    stock = _train(engine, rank)
    engine.destroy()
    forget_engine(engine)
    del engine, _, model

    # Kept, as a training script keeps its model: close() must free what the model does not own.
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    run = ods.enable(
        model,
        config=config,
        policy="cxl_aware",
        budgets={"dram": WORKER_DRAM_BUDGET_NBYTES},
        topology=discover(),
        tokens=32,
    )
    last_loss: list = []
    patched = _train(run.engine, rank, keep=last_loss)
    node0 = next(r for r in run.placement.allocator.usage() if r.tier == "dram" and r.node == 0)
    pages: dict[int, int] = {}
    for placed in run.placement.placed:
        for node, count in placed.allocation.buffer.pages_per_node().items():
            pages[node] = pages.get(node, 0) + count
    by_site: dict[str, int] = {}
    for placed in run.placement.placed:
        site = placed.site.rsplit(":", 1)[0] if placed.site.count(":") == 2 else placed.site
        by_site[site] = by_site.get(site, 0) + placed.nbytes
    result = {
        "stock": stock,
        "patched": patched,
        "n_params": n_params,
        "placed_nbytes_by_class": run.placement.nbytes_by_class(),
        "placed_by_site": by_site,
        "dram_node0_by_class": {k: v for k, v in node0.used_nbytes_by_class.items() if v},
        "pages_per_node": pages,
        "unplaced": run.placement.unplaced_nbytes_by_class(),
        "rank_budget_nbytes": run.plan.budgets_nbytes["dram"],
    }
    if stage == 3:
        closing = _close(run)
        # Under ZeRO-3 the model's parameter partitions are our "params" buffers, and the last
        # loss's autograd graph holds the model.
        del model, last_loss
        run.placement.close()
        closing["after_drop_used_nbytes"] = _used_nbytes(run.placement)
        closing["after_drop_unfreed_buffers"] = _unfreed(run.placement)
        result["close_with_the_model_kept"] = closing
        out.write_text(json.dumps(result))
        return
    kept = run.engine.optimizer.single_partition_of_fp32_groups[0]
    closing = _close(run)
    del kept
    run.placement.close()
    closing["after_drop_used_nbytes"] = _used_nbytes(run.placement)
    closing["after_drop_unfreed_buffers"] = _unfreed(run.placement)
    result["close_with_a_kept_tensor"] = closing
    with_activations = ods.enable(
        tiny_llama(0, hidden=64, layers=2, vocab=128),
        config=config,
        policy="planned",
        budgets={"dram": WORKER_DRAM_BUDGET_NBYTES},
        tokens=32,
        activations="checkpoint",
        activation_min_nbytes=1024,
    )
    result["planned_policy"] = with_activations.plan.policy
    result["activation_offload_losses"] = _train(with_activations.engine, rank)
    result["activations_offloaded"] = with_activations.activations.offloader.offloaded_count
    with_activations.close()
    out.write_text(json.dumps(result))


def _used_nbytes(placement) -> int:
    return sum(row.used_nbytes for row in placement.allocator.usage() if row.node is None)


def _unfreed(placement) -> int:
    return sum(1 for p in placement.placed if not p.allocation.buffer.freed)


def _close(run) -> dict:
    """run.close(), and what it left: warnings, bytes still charged, buffers still mapped."""
    import warnings

    from offload.deepspeed.buffer_placement import BuffersInUseWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.close()
    count = sum(1 for w in caught if issubclass(w.category, BuffersInUseWarning))
    busy = {p.tensor_class for p in run.placement.placed if not p.allocation.released}
    return {
        "warnings": count,
        "used_nbytes": _used_nbytes(run.placement),
        "unfreed_buffers": _unfreed(run.placement),
        "busy_classes": sorted(busy),
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="one rank of a DeepSpeed CPU offload run")
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _worker(args.stage, args.out)
