import pytest

from allocators.tensor_classes import TENSOR_CLASSES, check_tensor_class
from offload.planning.host_groups import host_tensor_groups, nbytes_by_group

# A 7B-ish shape: P = 7.2e9, micro-batch 3, sequence 4096, hidden 4096, 32 layers.
P = 7_200_000_000
SHAPE = {"n_params": P, "batch": 3, "seq": 4096, "hidden": 4096, "layers": 32}


def test_the_seven_items_come_in_the_papers_priority_order():
    names = [g.name for g in host_tensor_groups(**SHAPE)]
    assert names == [
        "momentum",
        "variance",
        "master_grads",
        "master_params",
        "compute_params",
        "activation_checkpoints",
        "compute_grads",
    ]


def test_the_first_four_items_make_up_the_latency_critical_group():
    groups = [g.group_name for g in host_tensor_groups(**SHAPE)]
    assert groups == [
        *["latency_critical"] * 4,
        "compute_params",
        "activation_checkpoints",
        "compute_grads",
    ]


def test_adam_item_sizes_follow_the_papers_accounting():
    items = {g.name: g for g in host_tensor_groups(**SHAPE, optimizer="adam")}
    for name in ("momentum", "variance", "master_grads", "master_params"):
        assert items[name].nbytes == 4 * P
    # momentum 4P + variance 4P + fp32 master grads 4P + fp32 master weights 4P = 16P
    assert nbytes_by_group(items.values())["latency_critical"] == 16 * P == 115_200_000_000
    assert items["compute_params"].nbytes == 2 * P == 14_400_000_000
    # 2 bytes * b 3 * s 4096 * h 4096 * L 32 = 3 * 2**31 = 3 GiB
    assert items["activation_checkpoints"].nbytes == 3_221_225_472
    assert items["compute_grads"].nbytes == 2 * P


def test_lion_has_no_variance_item_so_its_critical_group_is_4p_smaller():
    adam = host_tensor_groups(**SHAPE, optimizer="adam")
    lion = host_tensor_groups(**SHAPE, optimizer="lion")
    assert [g.name for g in lion] == [g.name for g in adam if g.name != "variance"]
    # Lion: momentum 4P + master grads 4P + master weights 4P = 12P
    assert nbytes_by_group(lion)["latency_critical"] == 12 * P
    assert [name for g in lion[:3] for name, _ in g.parts] == [
        "lion momentum (fp32)",
        "master grads (fp32)",
        "master weights (fp32)",
    ]


def test_adamw_is_sized_like_adam():
    assert host_tensor_groups(**SHAPE, optimizer="adamw") == host_tensor_groups(**SHAPE)


def test_parts_add_up_to_each_item():
    for group in host_tensor_groups(**SHAPE):
        assert sum(n for _, n in group.parts) == group.nbytes


def test_only_the_latency_critical_items_are_cpu_touched():
    assert [g.cpu_touched for g in host_tensor_groups(**SHAPE)] == [True] * 4 + [False] * 3


def test_items_hold_every_training_class_and_no_kv_cache():
    classes = [c for g in host_tensor_groups(**SHAPE) for c in g.tensor_classes]
    # Momentum and variance are both optimizer state; every other class is one item's.
    assert sorted(classes) == sorted(
        [*(c for c in TENSOR_CLASSES if c != "kv_cache"), "optimizer_state"]
    )


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(ValueError, match="'sgd' is not known; write 'adam'.*'lion'"):
        host_tensor_groups(**SHAPE, optimizer="sgd")


@pytest.mark.parametrize("field", ["n_params", "batch", "seq", "hidden", "layers"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_shape_values_must_be_positive_integers(field, bad):
    with pytest.raises(ValueError, match=f"{field} = .* must be a positive integer"):
        host_tensor_groups(**{**SHAPE, field: bad})


def test_unknown_tensor_class_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'weights' is not known; write one of optimizer_state"):
        check_tensor_class("weights")
