"""Placing the KV cache of a decode: hand-worked placements of the paper's policies on the declared
paper machines, the decode-step prediction, `planned` within budgets and no slower than cxl_aware,
and `offload plan --decode`.

Workload throughout: qwen2.5-7b (28 layers, 4 KV heads, head dim 128), 131072 tokens, batch 1,
bf16: the KV cache is 4 * 28 * 4 * 128 * 131072 bytes = 7 GiB, in 1024-token blocks of 2 MiB per
layer. paper-1aic: node 0 DRAM, node 1 CXL; paper-2aic: node 0 DRAM, nodes 1 and 2 CXL.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocators.declared_topology import load_declared
from allocators.errors import BudgetExceededError
from allocators.placement import as_placement
from allocators.topology import NodeRates
from offload.planning.host_groups import kv_cache_group
from offload.planning.model_shapes import MODELS, ModelShape
from offload.planning.planner import plan_decode
from offload.planning.simulator.decode import (
    DecodeConfig,
    DecodeSimulationError,
    decode_traffic,
    kv_cache_group_for,
    simulate_decode,
)
from offload.planning.simulator.rates import GIB, sim_rates
from offload.tools.cli import main as offload_main

QWEN = MODELS["qwen2.5-7b"]
CONTEXT = 131072
KV = 7 * GIB
TOPOLOGIES = {cards: load_declared(f"paper-{cards}aic") for cards in (1, 2)}
RATES = {cards: sim_rates(topo) for cards, topo in TOPOLOGIES.items()}


def place(policy: str, cards: int, dram: str, cxl: str = "64GiB", rates=None, context=CONTEXT):
    return plan_decode(
        QWEN,
        TOPOLOGIES[cards].tiers,
        {"dram": dram, "cxl": cxl},
        policy,
        context_tokens=context,
        rates=rates or RATES[cards],
    )


def rows(decode_plan):
    item = decode_plan.result.groups[0]
    return item.rule, item.nbytes_per_node


def test_the_group_is_4_l_kvh_d_t_bytes_in_bf16():
    group = kv_cache_group_for(QWEN, CONTEXT)
    assert group.nbytes == 4 * 28 * 4 * 128 * CONTEXT == KV
    assert group.tensor_classes == ("kv_cache",) and not group.cpu_touched
    assert kv_cache_group(28, 4, 128, CONTEXT, batch=3, dtype_nbytes=4).nbytes == 6 * KV


def test_the_group_counts_whole_blocks_as_the_cache_holds_them():
    # 1000 tokens in 1024-token blocks: one whole block per layer.
    assert kv_cache_group_for(QWEN, 1000).nbytes == kv_cache_group_for(QWEN, 1024).nbytes


@pytest.mark.parametrize("cards", [1, 2])
def test_local_only_puts_the_cache_on_dram_or_refuses(cards):
    assert rows(place("local_only", cards, "8GiB")) == ("local", {0: KV})
    with pytest.raises(BudgetExceededError, match="'kv_cache'.*Raise budget 'dram'"):
        place("local_only", cards, "4GiB")


def test_naive_interleave_splits_evenly_over_dram_and_every_card():
    assert rows(place("naive_interleave", 1, "8GiB")) == ("interleave", {0: KV // 2, 1: KV // 2})
    # 7 GiB / 3 leaves one byte over: the first node takes it.
    third = KV // 3
    assert rows(place("naive_interleave", 2, "8GiB")) == (
        "interleave",
        {0: third + 1, 1: third, 2: third},
    )


@pytest.mark.parametrize(
    ("cards", "dram", "expected"),
    [
        # Fits in DRAM: all local.
        (1, "8GiB", ("local", {0: KV})),
        (2, "8GiB", ("local", {0: KV})),
        # Some DRAM left, even share (3.5 GiB, 2.33 GiB) fits in it: round-robin.
        (1, "4GiB", ("interleave", {0: KV // 2, 1: KV // 2})),
        (2, "4GiB", ("interleave", {0: KV // 3 + 1, 1: KV // 3, 2: KV // 3})),
        # Even share too big for the 2 GiB left: DRAM takes 2 GiB, the cards the rest evenly.
        (1, "2GiB", ("interleave", {0: 2 * GIB, 1: 5 * GIB})),
        (2, "2GiB", ("interleave", {0: 2 * GIB, 1: 5 * GIB // 2, 2: 5 * GIB // 2})),
        # No DRAM: striped over the cards.
        (1, 0, ("cxl_stripe", {1: KV})),
        (2, 0, ("cxl_stripe", {1: KV // 2, 2: KV // 2})),
    ],
)
def test_cxl_aware_treats_the_cache_as_the_paper_treats_compute_weights(cards, dram, expected):
    assert rows(place("cxl_aware", cards, dram)) == expected


def test_one_card_alone_is_slower_than_the_link_two_cards_are_not():
    # An x16 card reads at 49.8 GiB/s against the link's 51.8; two cards together cover it.
    one = place("cxl_aware", 1, 0).prediction
    two = place("cxl_aware", 2, 0).prediction
    dram = place("local_only", 1, "8GiB").prediction
    assert one.bottleneck == "node 1"
    assert two.bottleneck == dram.bottleneck == "link h2d"
    assert one.step_s > dram.step_s == pytest.approx(two.step_s)
    # node 1 serves the 7 GiB read and the 28 x 2 MiB written back, one after the other.
    assert one.dma_s == pytest.approx(7 / 49.8 + 28 * 2 / 1024 / 34.7)


def test_a_decode_step_streams_every_layer_back_in_whole_blocks():
    traffic, h2d_copies, d2h_copies, streamed = decode_traffic(
        QWEN, 1500, 1, as_placement([(0, 1), (1, 3)])
    )
    # 1500 tokens: 2 blocks per layer of 2 * 4 * 1024 * 128 * 2 bytes = 2 MiB.
    assert (h2d_copies, d2h_copies, streamed) == (56, 28, 28)
    assert sum(traffic.h2d.values()) == 28 * 2 * (2 << 20)
    assert traffic.h2d[1] == 3 * traffic.h2d[0]
    assert sum(traffic.d2h.values()) == 28 * (2 << 20)


def test_a_device_slot_per_layer_streams_nothing_back():
    config = DecodeConfig(hbm_layers=28)
    prediction = simulate_decode(QWEN, CONTEXT, 1, as_placement(1), RATES[1], config)
    assert prediction.h2d_nbytes == 0 and prediction.streamed_layers == 0
    assert prediction.d2h_nbytes == 28 * (2 << 20)


def test_tokens_per_s_count_the_batch():
    one = simulate_decode(QWEN, 4096, 1, as_placement(0), RATES[1])
    four = simulate_decode(QWEN, 4096, 4, as_placement(0), RATES[1])
    assert four.tokens_per_s == pytest.approx(4 / four.step_s)
    assert four.h2d_nbytes == 4 * one.h2d_nbytes


def test_bad_decode_settings_say_what_to_write():
    with pytest.raises(DecodeSimulationError, match="block_tokens = 0"):
        DecodeConfig(block_tokens=0)
    with pytest.raises(DecodeSimulationError, match="context_tokens = -1"):
        simulate_decode(QWEN, -1, 1, as_placement(0), RATES[1])


def test_planned_keeps_enough_dram_to_hold_one_card_under_the_link():
    # cxl_aware with no DRAM left stripes it all on the card (card-bound); with 1 GiB of DRAM
    # planned takes it and the card's 6 GiB no longer bound the step.
    ours = place("planned", 1, "1GiB").prediction
    assert ours.bottleneck == "link h2d"
    assert ours.step_s < place("cxl_aware", 1, 0).prediction.step_s


def test_planned_moves_bytes_off_a_slow_card_that_cxl_aware_splits_evenly():
    # A card reading at 25 GiB/s: cxl_aware's 1:1 split (3.5 GiB fits in the 5 GiB of DRAM)
    # leaves the card the bottleneck; planned puts more on DRAM until the link is.
    slow = sim_rates(
        TOPOLOGIES[1], overrides={1: NodeRates(h2d_gib_per_s=25.0, d2h_gib_per_s=20.0)}
    )
    theirs = place("cxl_aware", 1, "5GiB", rates=slow)
    ours = place("planned", 1, "5GiB", rates=slow)
    assert theirs.prediction.bottleneck == "node 1"
    assert ours.prediction.bottleneck == "link h2d"
    assert ours.prediction.step_s < theirs.prediction.step_s
    assert ours.placement.fraction(0) > 0.5
    assert ours.result.groups[0].nbytes_per_node[0] <= 5 * GIB


def test_planned_refuses_with_the_bytes_and_the_budgets_when_the_cache_cannot_fit():
    with pytest.raises(BudgetExceededError) as info:
        place("planned", 2, "1GiB", cxl="2GiB")
    message = str(info.value)
    assert "7.00 GiB" in message and str(KV) in message
    assert "dram = 1.00 GiB" in message and "shorten the context or the batch" in message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 4, 8]),
    context=st.integers(1, 200_000),
    batch=st.integers(1, 4),
    dram_share=st.floats(0.0, 1.2),
    cxl_share=st.floats(0.0, 1.5),
    cards=st.sampled_from([1, 2]),
)
def test_planned_never_exceeds_a_budget_and_is_no_slower_than_cxl_aware(
    layers, kv_heads, context, batch, dram_share, cxl_share, cards
):
    shape = ModelShape("random", layers, 1024, 2048, 16, kv_heads, 64, 32000)
    need = kv_cache_group_for(shape, context, batch).nbytes
    budgets = {"dram": int(need * dram_share), "cxl": int(need * cxl_share)}
    tiers = TOPOLOGIES[cards].tiers

    def run(policy):
        return plan_decode(
            shape, tiers, budgets, policy, context_tokens=context, batch=batch, rates=RATES[cards]
        )

    try:
        ours = run("planned")
    except BudgetExceededError:
        assert dram_share + cxl_share < 1.01  # refusing is only right when nothing could fit
        return
    item = ours.result.groups[0]
    assert sum(item.nbytes_per_node.values()) == need
    for node, nbytes in item.nbytes_per_node.items():
        assert nbytes <= ours.result.budgets.node_nbytes.get(node, 0), (node, nbytes)
    try:
        theirs = run("cxl_aware")
    except BudgetExceededError:
        return
    assert ours.prediction.step_s <= theirs.prediction.step_s * (1 + 1e-9)


DECODE_ARGS = [
    "plan",
    "--model",
    "qwen2.5-7b",
    "--decode",
    "--context",
    str(CONTEXT),
    "--topology",
    "paper-1aic",
]


def test_cli_decode_json_has_the_placement_and_the_decode_step(capsys):
    args = [*DECODE_ARGS, "--policy", "cxl_aware", "--budget", "dram=2GiB", "--budget", "cxl=64GiB"]
    assert offload_main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "decode" and data["policy"] == "cxl_aware"
    group = data["groups"][0]
    assert group["name"] == "kv_cache" and group["nbytes"] == KV
    assert group["nbytes_per_node"] == {"0": 2 * GIB, "1": 5 * GIB}
    step = data["decode_step"]
    assert step["h2d_nbytes"] == KV and step["bottleneck"] == "link h2d"
    assert step["tokens_per_s_dma_bound"] == pytest.approx(1 / step["step_s"])
    assert data["source"] == "simulated"


def test_cli_decode_tables_name_the_group_nodes_and_tokens_per_s(capsys):
    assert offload_main([*DECODE_ARGS, "--batch", "2", "--budget", "dram=64GiB"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "14.00 GiB" in out and "node 0 (dram)" in out
    assert "tokens/s bound by DMA" in out


def test_cli_decode_needs_a_context_and_context_needs_decode(capsys):
    assert offload_main(["plan", "--model", "qwen2.5-7b", "--decode"]) == 2
    assert "--decode needs --context" in capsys.readouterr().err
    assert offload_main(["plan", "--model", "qwen2.5-7b", "--context", "4096"]) == 2
    assert "add --decode" in capsys.readouterr().err


def test_cli_decode_refusal_is_an_error_line_not_a_traceback(capsys):
    args = [*DECODE_ARGS, "--budget", "dram=1GiB", "--budget", "cxl=1GiB"]
    assert offload_main(args) == 2
    assert "raise a budget" in capsys.readouterr().err
