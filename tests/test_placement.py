import pytest

from allocators.errors import PlacementError
from allocators.placement import Placement, as_placement, interleave


def test_weights_are_normalised_to_fractions():
    assert as_placement([(0, 1), (2, 3)]).shares == ((0, 0.25), (2, 0.75))


def test_a_single_node_id_is_a_whole_placement():
    assert as_placement(3) == Placement(shares=((3, 1.0),))


def test_interleave_gives_equal_shares():
    assert [f for _, f in interleave([0, 1, 2, 3]).shares] == [0.25] * 4


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ([], "empty"),
        ([(0, 0.5), (0, 0.5)], "twice"),
        ([(-1, 1)], "not a NUMA node"),
        ([(0, 0)], "positive"),
        ([(0, float("nan"))], "positive"),
        ("node0", "pairs"),
        (True, "not a node"),
        ([(0, "half")], "not a number"),
    ],
)
def test_bad_placements_say_what_is_wrong(spec, fragment):
    with pytest.raises(PlacementError, match=fragment):
        as_placement(spec)
