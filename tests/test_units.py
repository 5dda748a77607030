import pytest

from allocators.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("64GiB", 64 * 2**30),
        ("512 MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5kB", 1500),
        ("4096", 4096),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size_reads_binary_and_decimal_units(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["64 gigs", "", "GiB", "-1GiB", -5, True, None, [1]])
def test_parse_size_rejects_with_a_hint(bad):
    with pytest.raises(ValueError, match="budget 'dram'.*(write|negative|bytes)"):
        parse_size(bad, what="budget 'dram'")


def test_format_bytes_picks_a_binary_unit():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(200 * 2**30) == "200 GiB"
