"""Striping math: cut a buffer of nbytes into chunk-aligned extents, one node each, in shares.

Pure arithmetic on integers and fractions; it must not call the OS or touch memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from allocators.placement import Placement, as_placement

# One x86_64/aarch64 PMD huge page: a chunk never splits a transparent huge page over nodes.
DEFAULT_CHUNK_NBYTES = 2 << 20


@dataclass(frozen=True)
class Extent:
    """``[offset, offset + length)`` of a buffer, placed on ``node``."""

    offset: int
    length: int
    node: int


def chunk_counts(
    nbytes: int, placement: Placement, chunk_nbytes: int
) -> tuple[dict[int, int], int]:
    """Whole chunks per node and the node that takes the tail (the last, partial chunk).

    Largest remainder on exact fractions: each node first gets the whole chunks its share
    covers; the chunks left over go to the largest remainders, and the tail to the next one.
    Every node then ends within one chunk of ``fraction * nbytes`` (a node given an extra
    chunk had a remainder > 0; a node given nothing is short by its remainder < one chunk).
    Returns ``({node: whole_chunks}, tail_node)``; ``tail_node`` is -1 when there is no tail.

    >>> chunk_counts(10, as_placement([(0, 1), (1, 1)]), 4)
    ({0: 1, 1: 1}, 0)
    """
    weights = {node: Fraction(fraction) for node, fraction in placement.shares}
    total = sum(weights.values())
    targets = {node: w * nbytes / total for node, w in weights.items()}
    counts = {node: int(t // chunk_nbytes) for node, t in targets.items()}
    whole_chunks, tail_nbytes = divmod(nbytes, chunk_nbytes)
    left_over = whole_chunks - sum(counts.values())
    order = sorted(
        placement.nodes,
        key=lambda node: (
            -(targets[node] - counts[node] * chunk_nbytes),
            placement.nodes.index(node),
        ),
    )
    for node in order[:left_over]:
        counts[node] += 1
    tail_node = order[left_over] if tail_nbytes else -1
    return counts, tail_node


def stripe(
    nbytes: int, placement: Placement | int | list[tuple[int, float]], chunk_nbytes: int
) -> list[Extent]:
    """Extents that tile ``[0, nbytes)`` with each node's share within one chunk of its fraction.

    Chunks are interleaved (error diffusion: each next chunk goes to the node furthest behind
    its share so far), so every node's pages spread over the whole buffer and a DMA of any
    large slice draws on all nodes at once. Adjacent chunks of one node merge into one extent.

    >>> [(e.offset, e.length, e.node) for e in stripe(12, [(0, 1), (1, 2)], 4)]
    [(0, 4, 1), (4, 4, 0), (8, 4, 1)]
    >>> stripe(10, 0, 4)
    [Extent(offset=0, length=10, node=0)]
    """
    placement = as_placement(placement)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes = {nbytes!r} must be a positive int (bytes to stripe)")
    if isinstance(chunk_nbytes, bool) or not isinstance(chunk_nbytes, int) or chunk_nbytes <= 0:
        raise ValueError(
            f"chunk_nbytes = {chunk_nbytes!r} must be a positive int, e.g. {DEFAULT_CHUNK_NBYTES}"
        )
    counts, tail_node = chunk_counts(nbytes, placement, chunk_nbytes)
    total_chunks = sum(counts.values())
    assigned = dict.fromkeys(counts, 0)
    extents: list[Extent] = []
    for step in range(1, total_chunks + 1):
        # Integer form of "largest counts[n] * step / total - assigned[n]", ties by listed order.
        node = max(
            (n for n in placement.nodes if assigned[n] < counts[n]),
            key=lambda n: counts[n] * step - assigned[n] * total_chunks,
        )
        assigned[node] += 1
        _append(extents, (step - 1) * chunk_nbytes, chunk_nbytes, node)
    if tail_node >= 0:
        _append(
            extents, total_chunks * chunk_nbytes, nbytes - total_chunks * chunk_nbytes, tail_node
        )
    return extents


def _append(extents: list[Extent], offset: int, length: int, node: int) -> None:
    if extents and extents[-1].node == node:
        last = extents[-1]
        extents[-1] = Extent(last.offset, last.length + length, node)
    else:
        extents.append(Extent(offset, length, node))


def bytes_per_node(extents: list[Extent]) -> dict[int, int]:
    """Total bytes each node holds in ``extents``.

    >>> bytes_per_node(stripe(12, [(0, 1), (1, 2)], 4))
    {1: 8, 0: 4}
    """
    totals: dict[int, int] = {}
    for extent in extents:
        totals[extent.node] = totals.get(extent.node, 0) + extent.length
    return totals


def split_nbytes(nbytes: int, placement: Placement, chunk_nbytes: int = 1) -> dict[int, int]:
    """Bytes per node when ``nbytes`` is cut into ``chunk_nbytes`` pieces shared by ``placement``.

    The default cuts at single bytes (exact shares that add up to ``nbytes``, as plans need); a
    buffer's real split uses its chunk size. Both come from allocators.striping's chunk counts,
    so a plan and the buffers made from it agree on who gets the odd chunk.

    >>> from allocators.placement import interleave
    >>> split_nbytes(10, interleave([0, 1, 2]))
    {0: 4, 1: 3, 2: 3}
    >>> split_nbytes(5 << 20, interleave([0, 1]), chunk_nbytes=2 << 20) == {0: 3 << 20, 1: 2 << 20}
    True
    """
    counts, tail_node = chunk_counts(nbytes, placement, chunk_nbytes)
    per_node = {node: count * chunk_nbytes for node, count in counts.items()}
    if tail_node >= 0:
        per_node[tail_node] += nbytes - sum(per_node.values())
    return per_node
