"""Policies against plans worked out by hand from the paper's algorithm.

Shape used throughout (see test_tensor_classes): P = 7.2e9, b=3, s=4096, h=4096, L=32, Adam.
The policies visit the paper's seven items one by one:
  G1 latency_critical: momentum, variance, master_grads, master_params, 4P = 28_800_000_000 each
  G2 compute_params          2P =  14_400_000_000
  G3 activation_checkpoints 2bshL =  3_221_225_472 (3 GiB)
  G4 compute_grads           2P =  14_400_000_000
Node 0 is local DRAM; nodes 1 (and 2) are CXL.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocators.errors import BudgetExceededError, PlacementError
from allocators.placement import as_placement, interleave
from allocators.policies import (
    POLICIES,
    Budgets,
    cxl_aware,
    get_policy,
    local_only,
    naive_interleave,
    parse_budgets,
)
from allocators.striping import split_nbytes
from allocators.tensor_classes import TensorGroup
from allocators.topology import NumaNode, Topology
from offload.planning.host_groups import host_tensor_groups, kv_cache_group

P = 7_200_000_000
ACT = 3_221_225_472
GROUPS = host_tensor_groups(n_params=P, batch=3, seq=4096, hidden=4096, layers=32)
TIB = 1 << 40


def tiers_with(n_cxl: int):
    dram = NumaNode(id=0, kind="dram", cpus=(0, 1), total_bytes=TIB, free_bytes=TIB)
    cxl = [
        NumaNode(id=i, kind="cxl", cpus=(), total_bytes=TIB, free_bytes=TIB)
        for i in range(1, n_cxl + 1)
    ]
    nodes = (dram, *cxl)
    distances = {a.id: {b.id: 10 if a.id == b.id else 14 + b.id for b in nodes} for a in nodes}
    return Topology(nodes=nodes, distances=distances, gpus=(), source="test").tiers


CRITICAL = ("momentum", "variance", "master_grads", "master_params")
ITEM = 4 * P  # each latency-critical item


def plan_rows(plan):
    return [(g.group.name, g.rule, g.nbytes_per_node) for g in plan.groups]


def all_local(names=CRITICAL):
    return [(name, "local", {0: ITEM}) for name in names]


def test_cxl_aware_one_cxl_node_group2_partial_then_cxl_only():
    # dram = 16P + 4e9 = 119_200_000_000; cxl = 64e9 all on node 1.
    # G1 115.2e9 <= 119.2e9: local; local left 4e9.
    # G2 14.4e9 > 4e9, left > 0: interleave over {0, 1}; even share 7.2e9 > 4e9 left, so
    #    local takes 4e9 and node 1 the rest 10.4e9; local left 0.
    # G3, G4: no local left: all on node 1. Node 1 total 10.4e9 + 3_221_225_472 + 14.4e9.
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 119_200_000_000, "cxl": 64_000_000_000})
    assert plan_rows(plan) == [
        *all_local(),
        ("compute_params", "interleave", {0: 4_000_000_000, 1: 10_400_000_000}),
        ("activation_checkpoints", "cxl_stripe", {1: ACT}),
        ("compute_grads", "cxl_stripe", {1: 14_400_000_000}),
    ]
    assert plan.placements["compute_params"].nodes == (0, 1)
    assert plan.placements["compute_params"].fraction(0) == pytest.approx(4 / 14.4)
    table = plan.table()
    assert table.loc["total", "node 1 (cxl)"] == 28_021_225_472
    assert table.loc["budget", "node 0 (dram)"] == 119_200_000_000


def test_cxl_aware_two_cxl_nodes_same_budget():
    # dram = 119.2e9; cxl = 64e9 -> 32e9 on each of nodes 1, 2.
    # G1 local, left 4e9. G2: even share 14.4e9 / 3 = 4.8e9 > 4e9 left, so local 4e9 and the
    #    rest 10.4e9 split over {1, 2}: 5.2e9 each; left 0.
    # G3: striped over {1, 2}: 3 GiB / 2 = 1_610_612_736 each. G4: 7.2e9 each.
    plan = cxl_aware(GROUPS, tiers_with(2), {"dram": 119_200_000_000, "cxl": 64_000_000_000})
    assert plan_rows(plan) == [
        *all_local(),
        ("compute_params", "interleave", {0: 4_000_000_000, 1: 5_200_000_000, 2: 5_200_000_000}),
        ("activation_checkpoints", "cxl_stripe", {1: 1_610_612_736, 2: 1_610_612_736}),
        ("compute_grads", "cxl_stripe", {1: 7_200_000_000, 2: 7_200_000_000}),
    ]
    assert plan.placements["compute_grads"] == interleave([1, 2])


def test_cxl_aware_even_interleave_when_the_local_share_fits():
    # dram = 16P + 6e9 = 121.2e9; two CXL nodes with 32e9 each.
    # G1 local, left 6e9. G2 14.4e9 > 6e9: interleave over {0, 1, 2}, 4.8e9 each (<= 6e9 left,
    #    so the plain 0/1 round-robin); left 1.2e9.
    # G3 3 GiB > 1.2e9: interleave, share 3 GiB / 3 = 1_073_741_824 <= 1.2e9: even; left
    #    1.2e9 - 1_073_741_824 = 126_258_176.
    # G4 14.4e9: interleave, share 4.8e9 > 126_258_176: local 126_258_176, rest
    #    14.4e9 - 126_258_176 = 14_273_741_824 -> 7_136_870_912 on each CXL node.
    plan = cxl_aware(GROUPS, tiers_with(2), {"dram": 121_200_000_000, "cxl": 64_000_000_000})
    assert plan_rows(plan)[4:] == [
        ("compute_params", "interleave", {0: 4_800_000_000, 1: 4_800_000_000, 2: 4_800_000_000}),
        ("activation_checkpoints", "interleave", {0: ACT // 3, 1: ACT // 3, 2: ACT // 3}),
        ("compute_grads", "interleave", {0: 126_258_176, 1: 7_136_870_912, 2: 7_136_870_912}),
    ]
    assert plan.placements["compute_params"] == interleave([0, 1, 2])
    assert plan.placements["activation_checkpoints"] == interleave([0, 1, 2])


def test_cxl_aware_everything_local_when_local_is_large():
    # 16P + 2P + 3 GiB + 2P = 144e9 + 3_221_225_472 fits in 150e9.
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 150_000_000_000, "cxl": 0})
    assert [g.rule for g in plan.groups] == ["local"] * 7


def test_cxl_aware_group_that_fits_exactly_is_local_and_leaves_no_local():
    # dram = 16P exactly: G1's four items fit (<=), left 0, so G2..G4 are striped over CXL only.
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 16 * P, "cxl": 64_000_000_000})
    assert [g.rule for g in plan.groups] == ["local"] * 4 + ["cxl_stripe"] * 3


def test_cxl_aware_places_the_critical_items_one_by_one_so_only_the_last_one_splits():
    # dram = 100e9 (the case: 16P does not fit). Item by item, as the paper's code:
    # momentum, variance, master grads 28.8e9 each fit: local, left 100e9 - 86.4e9 = 13.6e9.
    # master weights 28.8e9 > 13.6e9: interleave over {0, 1}, share 14.4e9 > 13.6e9 left, so
    #   local takes 13.6e9 and node 1 the rest 15.2e9; left 0.
    # The DMA-streamed items find no local left: all on node 1.
    # (Merged into one 16P group, half the optimizer data went to CXL and the rest stayed local.)
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 100_000_000_000, "cxl": 200_000_000_000})
    assert plan_rows(plan) == [
        *all_local(CRITICAL[:3]),
        ("master_params", "interleave", {0: 13_600_000_000, 1: 15_200_000_000}),
        ("compute_params", "cxl_stripe", {1: 14_400_000_000}),
        ("activation_checkpoints", "cxl_stripe", {1: ACT}),
        ("compute_grads", "cxl_stripe", {1: 14_400_000_000}),
    ]


def test_cxl_aware_two_cards_cap_the_split_items_local_share_at_what_is_left():
    # dram = 100e9, two cards: master weights' even share 28.8e9 / 3 = 9.6e9 <= 13.6e9 left, so
    # the plain 0/1 round-robin over {0, 1, 2}; left 4e9. compute_params: share 4.8e9 > 4e9, so
    # local takes 4e9 and nodes 1, 2 5.2e9 each; the rest is striped over the cards.
    plan = cxl_aware(GROUPS, tiers_with(2), {"dram": 100_000_000_000, "cxl": 200_000_000_000})
    assert plan_rows(plan) == [
        *all_local(CRITICAL[:3]),
        ("master_params", "interleave", {0: 9_600_000_000, 1: 9_600_000_000, 2: 9_600_000_000}),
        ("compute_params", "interleave", {0: 4_000_000_000, 1: 5_200_000_000, 2: 5_200_000_000}),
        ("activation_checkpoints", "cxl_stripe", {1: ACT // 2, 2: ACT // 2}),
        ("compute_grads", "cxl_stripe", {1: 7_200_000_000, 2: 7_200_000_000}),
    ]


def test_cxl_aware_lion_has_no_variance_item_and_leaves_room_that_adam_does_not():
    # dram = 100e9. Lion's momentum, master grads and master weights (3 x 28.8e9 = 86.4e9) fit:
    # local; left 13.6e9; compute_params 14.4e9 > 13.6e9: interleave, share 7.2e9 <= 13.6e9:
    # even; left 6.4e9; the checkpoints fit (3 GiB); compute_grads: local share capped at
    # 6.4e9 - 3_221_225_472 = 3_178_774_528.
    lion_groups = host_tensor_groups(
        n_params=P, batch=3, seq=4096, hidden=4096, layers=32, optimizer="lion"
    )
    budgets = {"dram": 100_000_000_000, "cxl": 200_000_000_000}
    lion = cxl_aware(lion_groups, tiers_with(1), budgets)
    assert plan_rows(lion) == [
        *all_local(("momentum", "master_grads", "master_params")),
        ("compute_params", "interleave", {0: 7_200_000_000, 1: 7_200_000_000}),
        ("activation_checkpoints", "local", {0: ACT}),
        ("compute_grads", "interleave", {0: 3_178_774_528, 1: 11_221_225_472}),
    ]


def test_cxl_aware_raises_when_the_cxl_budget_is_exceeded():
    # As in the one-node case, node 1 holds 10.4e9 + 3_221_225_472 = 13_621_225_472 after G3;
    # G4 needs 14.4e9 more but a 20e9 budget leaves 6_378_774_528.
    with pytest.raises(BudgetExceededError) as info:
        cxl_aware(GROUPS, tiers_with(1), {"dram": 119_200_000_000, "cxl": "20GB"})
    message = str(info.value)
    assert "group 'compute_grads'" in message
    assert "14400000000 bytes" in message
    assert "node 1 (cxl)" in message
    assert "5.94 GiB" in message  # 6_378_774_528 bytes left
    assert "cxl = 18.63 GiB" in message  # the budget as given, 20e9 bytes
    assert "Raise budget 'cxl'" in message


def test_cxl_aware_without_cxl_nodes_fails_when_local_is_too_small():
    with pytest.raises(BudgetExceededError, match="'compute_params'.*no CXL node"):
        cxl_aware(GROUPS, tiers_with(0), {"dram": 119_200_000_000, "cxl": "64GB"})


def test_naive_interleave_splits_every_group_evenly():
    # Each group over {0, 1, 2}: G1 38.4e9, G2 4.8e9, G3 1_073_741_824, G4 4.8e9 per node;
    # node 0 total 48e9 + 1_073_741_824 within 50e9; each CXL node likewise within 100e9 / 2.
    plan = naive_interleave(GROUPS, tiers_with(2), {"dram": 50_000_000_000, "cxl": 100_000_000_000})
    assert plan.nbytes_per_node == {
        **{name: {0: 9_600_000_000, 1: 9_600_000_000, 2: 9_600_000_000} for name in CRITICAL},
        "compute_params": {0: 4_800_000_000, 1: 4_800_000_000, 2: 4_800_000_000},
        "activation_checkpoints": {0: ACT // 3, 1: ACT // 3, 2: ACT // 3},
        "compute_grads": {0: 4_800_000_000, 1: 4_800_000_000, 2: 4_800_000_000},
    }
    assert set(plan.placements.values()) == {interleave([0, 1, 2])}


def test_naive_interleave_respects_the_local_budget():
    # Node 0 needs 48e9 + 1_073_741_824 in total; with 45e9 it overflows at G4
    # (38.4e9 + 4.8e9 + 1_073_741_824 = 44_273_741_824 used, 4.8e9 more does not fit).
    with pytest.raises(BudgetExceededError, match="'compute_grads'.*node 0 \\(dram\\)"):
        naive_interleave(GROUPS, tiers_with(2), {"dram": 45_000_000_000, "cxl": "1TB"})


def test_local_only_puts_everything_on_local_dram():
    plan = local_only(GROUPS, tiers_with(2), {"dram": "150GB", "cxl": "64GB"})
    assert [g.nbytes_per_node for g in plan.groups] == [
        *[{0: ITEM}] * 4,
        {0: 14_400_000_000},
        {0: ACT},
        {0: 14_400_000_000},
    ]
    assert plan.by_class()["optimizer_state"].nodes == (0,)


def test_local_only_refuses_when_local_is_too_small():
    # 121.2e9: G1 fits, G2 needs 14.4e9 with 6e9 left.
    with pytest.raises(BudgetExceededError, match="'compute_params'.*Raise budget 'dram'"):
        local_only(GROUPS, tiers_with(1), {"dram": 121_200_000_000, "cxl": "64GB"})


def test_by_class_maps_each_tensor_class_to_its_groups_placement():
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 119_200_000_000, "cxl": "64GB"})
    placements = plan.by_class()
    assert placements["master_params"] == placements["optimizer_state"] == interleave([0])
    assert placements["grads"] == interleave([1])
    assert "kv_cache" not in placements


def test_by_class_merges_the_items_of_one_class_weighted_by_their_bytes():
    # dram = 40e9: momentum local (left 11.2e9); variance interleaved, local capped at 11.2e9,
    # node 1 the other 17.6e9. optimizer_state holds both: 40e9 on node 0, 17.6e9 on node 1.
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 40_000_000_000, "cxl": "200GB"})
    assert plan.nbytes_per_node["variance"] == {0: 11_200_000_000, 1: 17_600_000_000}
    state = plan.by_class()["optimizer_state"]
    assert state.fraction(0) == pytest.approx(40 / 57.6)
    assert state.fraction(1) == pytest.approx(17.6 / 57.6)
    # A class held by one item keeps that item's placement as it is.
    assert plan.by_class()["grads"] is plan.placements["compute_grads"]


def test_cxl_budget_total_is_split_evenly_and_dicts_give_per_node_budgets():
    tiers = tiers_with(2)
    assert parse_budgets({"dram": 1, "cxl": "3GB"}, tiers).node_nbytes == {
        0: 1,
        1: 1_500_000_000,
        2: 1_500_000_000,
    }
    per_node = parse_budgets({"dram": 1, "cxl": {2: "1GB"}}, tiers)
    assert per_node.node_nbytes == {0: 1, 1: 0, 2: 1_000_000_000}
    assert per_node.declared == {"dram": 1, "cxl": 1_000_000_000}


def test_a_tier_not_named_keeps_its_nodes_capacity():
    # --budget dram=100GiB alone: the cards keep their capacity (1 TiB each here), as
    # `offload plan --help` promises; before, CXL got no budget and cxl_aware failed.
    budgets = parse_budgets({"dram": 100_000_000_000}, tiers_with(2))
    assert budgets.node_nbytes == {0: 100_000_000_000, 1: TIB, 2: TIB}
    assert budgets.from_capacity == ("cxl",)
    assert "cxl = 2.00 TiB (capacity, not named; node 1: 1.00 TiB" in budgets.describe()
    assert parse_budgets({"cxl": "1GB"}, tiers_with(1)).node_nbytes == {0: TIB, 1: 1_000_000_000}
    plan = cxl_aware(GROUPS, tiers_with(1), {"dram": 100_000_000_000})
    assert plan.groups[-1].nbytes_per_node == {1: 14_400_000_000}


def test_per_node_cxl_budget_is_enforced_per_node():
    # dram = 16P: G1 local, nothing left. G2 striped: 7.2e9 on each of nodes 1, 2; node 1 (8e9)
    # keeps 0.8e9, too little for its 1_610_612_736 share of G3 although node 2 has room.
    with pytest.raises(BudgetExceededError, match="'activation_checkpoints'.*node 1"):
        cxl_aware(GROUPS[:6], tiers_with(2), {"dram": 16 * P, "cxl": {1: "8GB", 2: "20GB"}})


@pytest.mark.parametrize(
    ("budgets", "fragment"),
    [
        ({"dram": "64 gigs"}, "budget 'dram' = '64 gigs' is not a size"),
        ({"dram": "1GB", "cxl": -5}, "budget 'cxl' = -5 is negative"),
        ({"dram": "1GB", "hbm": "80GB"}, "budget key 'hbm' is not a tier; write one of 'dram'"),
        ({"dram": "1GB", "cxl": {0: "1GB"}}, "names node 0, which is not a cxl node here"),
        ({"dram": "1GB", "cxl": {1: "lots"}}, "budget 'cxl' for node 1 = 'lots' is not a size"),
        ("64GiB", "not a mapping"),
    ],
)
def test_bad_budgets_name_the_key_and_say_what_to_write(budgets, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_budgets(budgets, tiers_with(2))


def test_parsed_budgets_pass_through():
    parsed = parse_budgets({"dram": "1GB"}, tiers_with(1))
    assert isinstance(parsed, Budgets)
    assert parse_budgets(parsed, tiers_with(1)) is parsed


def test_policies_need_a_local_dram_node():
    cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=TIB, free_bytes=TIB)
    tiers = Topology(nodes=(cxl,), distances={}, gpus=(), source="test").tiers
    with pytest.raises(PlacementError, match="no local DRAM node"):
        local_only(GROUPS, tiers, {"dram": "1GB", "cxl": "1TB"})


def test_registry_and_its_error_list_every_policy():
    assert get_policy("naive_interleave") is naive_interleave
    assert set(POLICIES) == {"local_only", "naive_interleave", "cxl_aware"}
    with pytest.raises(ValueError, match="'greedy' is not known; write one of local_only, "):
        get_policy("greedy")


def test_split_nbytes_handles_indivisible_sizes():
    assert split_nbytes(7, interleave([3, 5])) == {3: 4, 5: 3}
    assert sum(split_nbytes(10**12 + 1, interleave([0, 1, 2])).values()) == 10**12 + 1


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 10**12), min_size=1, max_size=6),
    dram=st.integers(0, 2 * 10**12),
    cxl=st.integers(0, 4 * 10**12),
    n_cxl=st.integers(1, 3),
)
def test_cxl_aware_follows_its_rules_and_never_passes_a_budget(sizes, dram, cxl, n_cxl):
    groups = [TensorGroup(f"g{i}", (), n, False, ()) for i, n in enumerate(sizes)]
    tiers = tiers_with(n_cxl)
    budgets = parse_budgets({"dram": dram, "cxl": cxl}, tiers)
    try:
        plan = cxl_aware(groups, tiers, budgets)
    except BudgetExceededError:
        return
    local_left = dram
    for item in plan.groups:
        assert sum(item.nbytes_per_node.values()) == item.group.nbytes
        if item.group.nbytes <= local_left:
            assert item.rule == "local"
        elif local_left > 0:
            assert item.rule == "interleave"
            assert set(item.nbytes_per_node) == set(range(n_cxl + 1))
        else:
            assert item.rule == "cxl_stripe"
            assert 0 not in item.nbytes_per_node
        local_left -= item.nbytes_per_node.get(0, 0)
        assert local_left >= 0
    for node, budget in budgets.node_nbytes.items():
        used = sum(g.nbytes_per_node.get(node, 0) for g in plan.groups)
        assert used <= budget


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 10**13), weights=st.lists(st.integers(1, 100), min_size=1, max_size=5))
def test_split_nbytes_is_exact_and_within_a_byte_of_each_share(nbytes, weights):
    placement = as_placement(list(enumerate(weights)))
    split = split_nbytes(nbytes, placement)
    assert sum(split.values()) == nbytes
    for node, fraction in placement.shares:
        assert abs(split[node] - nbytes * fraction) <= 1.5


KV = kv_cache_group(layers=32, kv_heads=8, head_dim=128, context_tokens=32768, batch=2)


def test_every_policy_places_a_kv_cache_group_for_the_allocator():
    # 4 * 32 * 8 * 128 * 32768 * 2 bytes = 8 GiB.
    assert KV.nbytes == 8 << 30
    budgets = {"dram": "16GiB", "cxl": "16GiB"}
    for name, policy in POLICIES.items():
        placements = policy([KV], tiers_with(2), budgets).by_class()
        assert set(placements) == {"kv_cache"}, name
    assert local_only([KV], tiers_with(2), budgets).by_class()["kv_cache"] == interleave([0])
    assert naive_interleave([KV], tiers_with(2), budgets).by_class()["kv_cache"] == interleave(
        [0, 1, 2]
    )


def test_cxl_aware_puts_the_kv_cache_where_it_puts_compute_weights_of_the_same_size():
    # Same size, same rule: the KV cache is a read stream like the bf16 weights.
    weights = TensorGroup("compute_params", ("params",), KV.nbytes, False, ())
    for dram in ("16GiB", "6GiB", "1GiB", 0):
        budgets = {"dram": dram, "cxl": "64GiB"}
        kv = cxl_aware([KV], tiers_with(2), budgets).groups[0]
        w = cxl_aware([weights], tiers_with(2), budgets).groups[0]
        assert (kv.rule, kv.nbytes_per_node) == (w.rule, w.nbytes_per_node), dram
