from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocators.placement import as_placement
from allocators.striping import bytes_per_node, chunk_counts, stripe

placements = st.lists(
    st.tuples(st.integers(0, 15), st.integers(1, 1000)),
    min_size=1,
    max_size=5,
    unique_by=lambda pair: pair[0],
).map(as_placement)
chunks = st.sampled_from([1, 3, 4096, 2 << 20])


@st.composite
def cases(draw):
    chunk = draw(chunks)
    nbytes = draw(st.integers(1, 300 * chunk))
    return nbytes, draw(placements), chunk


@settings(max_examples=300, deadline=None)
@given(cases())
def test_extents_tile_the_buffer_exactly(case):
    nbytes, placement, chunk = case
    offset = 0
    for extent in stripe(nbytes, placement, chunk):
        assert extent.offset == offset
        assert extent.length > 0
        offset += extent.length
    assert offset == nbytes


@settings(max_examples=300, deadline=None)
@given(cases())
def test_extents_are_chunk_aligned_except_the_tail(case):
    nbytes, placement, chunk = case
    extents = stripe(nbytes, placement, chunk)
    assert all(e.offset % chunk == 0 for e in extents)
    assert all(e.length % chunk == 0 for e in extents[:-1])


@settings(max_examples=300, deadline=None)
@given(cases())
def test_each_node_gets_its_share_within_one_chunk(case):
    nbytes, placement, chunk = case
    held = bytes_per_node(stripe(nbytes, placement, chunk))
    for node, fraction in placement.shares:
        target = Fraction(fraction) * nbytes / sum(Fraction(f) for _, f in placement.shares)
        assert abs(held.get(node, 0) - target) <= chunk


@settings(max_examples=200, deadline=None)
@given(cases())
def test_adjacent_extents_are_on_different_nodes(case):
    extents = stripe(*case)
    assert all(a.node != b.node for a, b in pairwise(extents))


def test_one_node_is_one_extent():
    extents = stripe(5 * 4096 + 17, 3, 4096)
    assert [(e.offset, e.length, e.node) for e in extents] == [(0, 5 * 4096 + 17, 3)]


def test_equal_shares_alternate_chunk_by_chunk():
    extents = stripe(8 * 4, [(0, 1), (2, 1)], 4)
    assert [e.node for e in extents] == [0, 2, 0, 2, 0, 2, 0, 2]


def test_a_small_share_is_spread_over_the_buffer_not_bunched():
    extents = stripe(100, [(0, 3), (1, 1)], 1)
    offsets_on_1 = [e.offset for e in extents if e.node == 1]
    assert len(offsets_on_1) == 25
    assert max(b - a for a, b in pairwise(offsets_on_1)) == 4


def test_chunk_counts_give_left_over_chunks_to_largest_remainders():
    # targets 6, 3.6 and 2.4 bytes: node 0 takes one whole chunk, the two left over go to
    # the remainders 3.6 (node 1) and 2.4 (node 2), not to node 0's remainder of 2.
    counts, tail = chunk_counts(12, as_placement([(0, 5), (1, 3), (2, 2)]), 4)
    assert counts == {0: 1, 1: 1, 2: 1}
    assert tail == -1


def test_the_tail_goes_to_the_next_largest_remainder():
    # targets 7.5 and 2.5 bytes of 10: whole chunks 1 and 0, remainders 3.5 and 2.5; the one
    # chunk left over goes to node 0 and the 2-byte tail to node 1.
    counts, tail = chunk_counts(10, as_placement([(0, 3), (1, 1)]), 4)
    assert counts == {0: 2, 1: 0}
    assert tail == 1


@pytest.mark.parametrize(
    ("nbytes", "chunk", "fragment"),
    [(0, 4096, "nbytes"), (-1, 4096, "nbytes"), (4096, 0, "chunk_nbytes"), (1.5, 4, "nbytes")],
)
def test_bad_sizes_say_what_is_wrong(nbytes, chunk, fragment):
    with pytest.raises(ValueError, match=fragment):
        stripe(nbytes, 0, chunk)
