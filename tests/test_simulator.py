"""The step simulator: the paper's DMA and CPU AdamW figures come out of the rate model, and each
phase responds to placement the way the module docstring says."""

from dataclasses import replace

import pytest

from allocators.declared_topology import load_declared
from allocators.placement import as_placement, interleave
from allocators.topology import NodeRates, NumaNode
from offload.config import OffloadConfig
from offload.planning.activation_bytes import estimate_activations
from offload.planning.host_groups import host_tensor_groups
from offload.planning.host_layout import HostLayout
from offload.planning.model_shapes import MODELS
from offload.planning.runtime_step import OUR_RUNTIME, host_groups, runtime_step
from offload.planning.simulator.rates import GIB, RateModelError, paper_rates, sim_rates
from offload.planning.simulator.step import (
    DEEPSPEED_ZERO3,
    SimulationError,
    StepConfig,
    simulate_step,
)
from offload.planning.simulator.traffic import Traffic, copy_seconds, memory_seconds

CLASSES = ("params", "activations", "grads", "master_grads", "master_params", "optimizer_state")


def everything_on(placement):
    return {c: placement for c in CLASSES}


def gib_per_s(placement, direction, rates, gpus=1):
    return 2 * GIB / copy_seconds(2 * GIB, placement, direction, rates, gpus) / GIB


# reference/PAPER.md: GiB/s at 2 GiB (one GPU, then two GPUs sharing the host, per GPU).
@pytest.mark.parametrize(
    ("placement", "direction", "gpus", "paper"),
    [
        (as_placement(0), "h2d", 1, 51.8),
        (as_placement(0), "d2h", 2, 51.2),
        (as_placement(1), "h2d", 1, 49.8),
        (as_placement(1), "d2h", 1, 34.7),
        (as_placement(1), "h2d", 2, 24.9),
        (as_placement(1), "d2h", 2, 18.2),
        (interleave([0, 1]), "d2h", 1, 50.2),
        (interleave([0, 1]), "h2d", 2, 49.6),
        (interleave([0, 1]), "d2h", 2, 34.5),
    ],
)
def test_dma_rates_match_the_paper_table_within_6_percent(placement, direction, gpus, paper):
    assert gib_per_s(placement, direction, paper_rates(1), gpus) == pytest.approx(paper, rel=0.06)


def test_a_striped_write_is_bound_by_the_slowest_share():
    # 1:4 DRAM:CXL puts 80% on the card: 34.7 / 0.8 = 43.4 GiB/s (paper: 42.1).
    rate = gib_per_s(as_placement([(0, 1), (1, 4)]), "d2h", paper_rates(1))
    assert rate == pytest.approx(34.7 / 0.8, rel=1e-3)


def test_a_second_card_doubles_what_the_cards_can_absorb():
    one = memory_seconds(_d2h(interleave([1])), paper_rates(2)).seconds
    two = memory_seconds(_d2h(interleave([1, 2])), paper_rates(2)).seconds
    assert one / two == pytest.approx(51.8 / 34.7, rel=1e-3)  # the link caps the doubling


def _d2h(placement):
    traffic = Traffic()
    traffic.add("d2h", 8 * GIB, placement)
    return traffic


def test_cpu_adamw_on_cxl_is_about_four_times_slower_than_on_dram():
    rates = paper_rates(1)
    nbytes = 28 * 545e6
    local = memory_seconds(Traffic(cpu={0: nbytes}), rates).seconds
    cxl = memory_seconds(Traffic(cpu={1: nbytes}), rates).seconds
    assert local == pytest.approx(54.8e-3, rel=0.01)
    assert cxl / local == pytest.approx(4.17, rel=0.01)


def test_half_the_optimizer_on_cxl_roughly_doubles_its_step():
    rates = paper_rates(1)
    nbytes = 28 * 545e6
    local = memory_seconds(Traffic(cpu={0: nbytes}), rates).seconds
    half = memory_seconds(Traffic(cpu={0: nbytes / 2, 1: nbytes / 2}), rates).seconds
    assert 1.8 < half / local < 2.3


def test_dma_and_cpu_on_one_card_queue_behind_each_other():
    rates = paper_rates(1)
    alone = memory_seconds(Traffic(d2h={1: GIB}), rates).seconds
    shared = memory_seconds(Traffic(d2h={1: GIB}, cpu={1: GIB}), rates).seconds
    assert shared == pytest.approx(alone + 1 / 62.1, rel=1e-6)


def test_dram_only_step_is_compute_bound_at_long_context():
    pred = simulate_step(
        MODELS["qwen2.5-7b"], 3, 32768, everything_on(as_placement(0)), paper_rates(1)
    )
    assert pred.bottlenecks["forward"] == "compute"
    assert pred.bottlenecks["backward"] == "compute"


def test_gradients_on_one_card_slow_a_short_backward():
    shape, rates = MODELS["qwen2.5-7b"], paper_rates(1)
    local = simulate_step(shape, 1, 4096, everything_on(as_placement(0)), rates)
    grads_on_cxl = {**everything_on(as_placement(0)), "grads": as_placement(1)}
    slow = simulate_step(shape, 1, 4096, grads_on_cxl, rates)
    assert slow.backward_s > local.backward_s
    assert slow.bottlenecks["backward"] == "node 1"
    assert slow.forward_s == local.forward_s


def test_overlapping_the_step_hides_all_but_the_last_buckets_step_and_copy_back():
    shape, rates = MODELS["qwen2.5-7b"], paper_rates(1)
    placements = everything_on(as_placement(0))
    serial = simulate_step(
        shape, 2, 32768, placements, rates, replace(OUR_RUNTIME, overlap_step=False)
    )
    overlapped = simulate_step(shape, 2, 32768, placements, rates, OUR_RUNTIME)
    assert overlapped.step_s == pytest.approx(serial.step_s / shape.layers)
    assert overlapped.total_s < serial.total_s


# What offload.enable runs; these fail if OUR_RUNTIME or runtime_step drift from its settings.


def test_our_runtime_keeps_params_on_the_device_and_reads_gradients_where_they_land():
    assert OUR_RUNTIME.offload_params is False
    assert OUR_RUNTIME.fp32_master_grads is False
    assert OUR_RUNTIME.overhead_s_per_param == 0.0


def test_our_runtime_is_enables_defaults_in_the_papers_activation_mode():
    defaults = OffloadConfig()
    assert OUR_RUNTIME == runtime_step(defaults.replace(activations="checkpoint"))
    assert OUR_RUNTIME.overlap_step is defaults.overlap_step
    assert OUR_RUNTIME.activation_min_nbytes == defaults.activation_min_nbytes
    assert OUR_RUNTIME.activation_mode == "checkpoint"
    assert OUR_RUNTIME.loss_chunk_tokens == defaults.loss_chunk_tokens
    assert OUR_RUNTIME.recompute and OUR_RUNTIME.offload_activations
    assert OUR_RUNTIME.param_nbytes == 2


def test_enables_default_activation_mode_moves_every_saved_tensor_and_recomputes_nothing():
    step = runtime_step(OffloadConfig())
    assert step.activation_mode == "saved_tensors" and not step.recompute
    shape = MODELS["llama-1.1b"]
    saved = estimate_activations(shape, batch=1, seq=4096).moved_nbytes
    assert _step_bytes(step, "d2h", "forward") == pytest.approx(saved / shape.n_params)
    # Every saved tensor, not one layer input per layer (1.1B at 4K: about 9x the bytes).
    assert _step_bytes(step, "d2h", "forward") > 8 * _step_bytes(OUR_RUNTIME, "d2h", "forward")


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        ({"overlap_step": False}, "overlap_step", False),
        ({"max_grad_norm": 1.0}, "overlap_step", False),
        ({"loss_chunk_tokens": 512}, "loss_chunk_tokens", 512),
        ({"activations": "saved_tensors"}, "activation_mode", "saved_tensors"),
        ({"activation_min_nbytes": 0}, "activation_min_nbytes", 0),
        ({"activations": "off"}, "offload_activations", False),
    ],
)
def test_the_runtime_step_follows_each_setting_it_depends_on(settings, field, value):
    step = runtime_step(OffloadConfig(**{"activations": "checkpoint", **settings}))
    assert getattr(step, field) == value


def test_our_runtime_is_planned_over_the_host_groups_enable_allocates():
    shape = MODELS["qwen2.5-7b"]
    groups = host_groups(OUR_RUNTIME, shape, 1, 4096)
    layout = HostLayout(activations="checkpoint")
    sizes = (shape.n_params, 1, 4096, shape.hidden, shape.layers)
    assert groups == layout.groups(*sizes, shape=shape)
    assert "compute_params" not in {g.name for g in groups}


def test_the_papers_runtime_keeps_its_four_groups():
    shape = MODELS["qwen2.5-7b"]
    paper = host_tensor_groups(shape.n_params, 1, 4096, shape.hidden, shape.layers)
    assert host_groups(DEEPSPEED_ZERO3, shape, 1, 4096) == paper


def test_lion_moves_fewer_optimizer_bytes_than_adam():
    shape, rates = MODELS["llama-1.1b"], paper_rates(1)
    placements = everything_on(as_placement(0))
    adam = simulate_step(shape, 1, 4096, placements, rates, StepConfig(optimizer="adam"))
    lion = simulate_step(shape, 1, 4096, placements, rates, StepConfig(optimizer="lion"))
    assert lion.step_s < adam.step_s


def test_a_missing_class_placement_is_named():
    placements = everything_on(as_placement(0))
    del placements["grads"]
    with pytest.raises(SimulationError, match="grads"):
        simulate_step(MODELS["llama-1.1b"], 1, 1024, placements, paper_rates(1))


def test_declared_rates_win_over_the_paper_defaults():
    topo = load_declared("paper-1aic")
    rates = sim_rates(topo, overrides={1: NodeRates(d2h_gib_per_s=20.0)})
    assert rates.nodes[1].d2h_gib_per_s == 20.0
    assert rates.nodes[1].h2d_gib_per_s == 49.8  # declared, not overridden
    assert any("cpu_gib_per_s from the paper" in note for note in rates.notes)


def test_a_measured_adamw_rate_sets_the_cpu_rate():
    node = NumaNode(0, "dram", (0,), 1 << 30, 1 << 30)
    rates = sim_rates((node,), adamw_elements_per_s={0: 1e9})
    assert rates.nodes[0].cpu_gib_per_s == pytest.approx(28e9 / GIB)


def test_a_negative_rate_is_refused():
    node = NumaNode(0, "dram", (0,), 1 << 30, 1 << 30, rates=NodeRates(h2d_gib_per_s=-1.0))
    with pytest.raises(RateModelError, match="positive"):
        sim_rates((node,))


def _step_bytes(config, kind="cpu", phase="step_cpu"):
    from offload.planning.simulator.step import phase_traffic

    shape = MODELS["llama-1.1b"]
    traffic = phase_traffic(shape, 1, 4096, everything_on(as_placement(0)), config)
    return sum(getattr(traffic[phase], kind).values()) / shape.n_params


def test_our_runtimes_fp32_layout_moves_adamws_28_bytes_per_param_in_the_step():
    ours = StepConfig(optimizer="adamw", param_nbytes=4, fp32_master_grads=False)
    assert _step_bytes(ours) == 28  # grad 4, master 4+4, two states 8+8
    assert _step_bytes(StepConfig(optimizer="adamw")) == 30  # DeepSpeed: + fp32 grads, bf16 write


def test_an_fp32_model_copies_its_master_back_and_a_bf16_model_its_half_copy():
    fp32 = StepConfig(offload_params=False, param_nbytes=4, fp32_master_grads=False)
    bf16 = StepConfig(offload_params=False, param_nbytes=2, fp32_master_grads=False)
    assert _step_bytes(fp32, "h2d", "step_dma") == 4
    assert _step_bytes(bf16, "h2d", "step_dma") == 2


def test_the_loss_log_probs_go_out_once_unless_chunked_and_small_checkpoints_stay():
    # log_softmax and nll_loss save the same tensor; the runtime copies it to the host once.
    # Chunked, the loss saves its chunks of hidden states instead: as many bytes as lm_head's.
    shape = MODELS["llama-1.1b"]
    checkpoints = 2 * 4096 * shape.hidden * shape.layers / shape.n_params
    plain = StepConfig()
    ours = StepConfig(activation_mode="checkpoint", activation_min_nbytes=1 << 20)
    chunked = replace(ours, loss_chunk_tokens=4096)
    assert _step_bytes(ours, "d2h", "forward") - _step_bytes(chunked, "d2h", "forward") == (
        pytest.approx(4 * 4096 * shape.vocab / shape.n_params)
    )
    assert _step_bytes(plain, "d2h", "forward") == pytest.approx(checkpoints)
    too_small = StepConfig(activation_min_nbytes=2 * 4096 * shape.hidden + 1)
    assert _step_bytes(too_small, "d2h", "forward") == 0


def test_an_unmodelled_param_size_is_refused():
    with pytest.raises(SimulationError, match="param_nbytes"):
        StepConfig(param_nbytes=8)


def test_on_a_cpu_device_a_copy_runs_at_the_copy_rate_even_below_the_optimizer_rate():
    from offload.planning.simulator.rates import host_device_rates

    rates = host_device_rates(copy_gib_per_s=8.0, cpu_gib_per_s=2.0)
    assert memory_seconds(Traffic(h2d={0: 8 * GIB}), rates).seconds == pytest.approx(1.0)
    # A copy and the optimizer on the one node queue behind each other.
    both = memory_seconds(Traffic(h2d={0: 8 * GIB}, cpu={0: 2 * GIB}), rates).seconds
    assert both == pytest.approx(2.0)


def test_a_fitted_device_predicts_the_forward_it_was_fitted_on():
    from offload.planning.simulator.compute import compute_seconds, fitted_device

    shape = MODELS["llama-1.1b"]
    device = fitted_device(shape, 1, 512, 0.25, "cpu")
    assert compute_seconds(shape, 1, 512, device, recompute=False)[0] == pytest.approx(0.25)
    gpu = fitted_device(shape, 1, 512, 0.25, "gpu", peak_flops_per_s=1e15)
    assert gpu.effective_flops_per_s == pytest.approx(device.effective_flops_per_s)
