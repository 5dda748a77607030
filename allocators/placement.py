"""A placement: which NUMA nodes hold a buffer and in what shares, validated once at the boundary.

Only the value type and its checks live here; striping bytes over nodes is allocators.striping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from allocators.errors import PlacementError


@dataclass(frozen=True)
class Placement:
    """Shares of a buffer per NUMA node, e.g. ``((0, 0.5), (2, 0.5))`` for DRAM:CXL 1:1.

    Shares are positive and add up to 1. Build one with :func:`as_placement`.

    >>> as_placement([(0, 1), (2, 3)]).shares
    ((0, 0.25), (2, 0.75))
    >>> as_placement(1).nodes
    (1,)
    """

    shares: tuple[tuple[int, float], ...]

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(node for node, _ in self.shares)

    def fraction(self, node: int) -> float:
        """Share of ``node`` (0.0 when the placement does not use it)."""
        return dict(self.shares).get(node, 0.0)

    def __str__(self) -> str:
        return " + ".join(f"node{n}:{f:.3g}" for n, f in self.shares)


def as_placement(spec: Placement | int | Iterable[tuple[int, float]]) -> Placement:
    """Validate a placement written as a node id, a Placement, or ``[(node, weight), ...]``.

    Weights may be any positive numbers (``[(0, 1), (2, 2)]`` means 1:2); they are normalised.
    Node existence is checked where the OS is asked (allocators.numa), not here.
    """
    if isinstance(spec, Placement):
        return spec
    if isinstance(spec, bool):
        raise PlacementError(f"placement {spec!r} is not a node; write 0 or [(0, 0.5), (2, 0.5)]")
    if isinstance(spec, int):
        spec = [(spec, 1.0)]
    try:
        pairs = [(node, weight) for node, weight in spec]
    except (TypeError, ValueError) as exc:
        raise PlacementError(
            f"placement {spec!r} is not a list of (node, fraction) pairs; "
            "write [(0, 0.5), (2, 0.5)] or a single node id"
        ) from exc
    if not pairs:
        raise PlacementError("placement is empty; give at least one (node, fraction) pair")
    seen: set[int] = set()
    for node, weight in pairs:
        if isinstance(node, bool) or not isinstance(node, int) or node < 0:
            raise PlacementError(f"placement node {node!r} is not a NUMA node id (an int >= 0)")
        if node in seen:
            raise PlacementError(f"placement names node {node} twice; merge its fractions")
        seen.add(node)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise PlacementError(f"fraction {weight!r} for node {node} is not a number")
        if not math.isfinite(weight) or weight <= 0:
            raise PlacementError(
                f"fraction {weight!r} for node {node} must be a positive finite number; "
                "leave a node out instead of giving it 0"
            )
    total = float(sum(w for _, w in pairs))
    return Placement(shares=tuple((node, float(w) / total) for node, w in pairs))


def interleave(nodes: Sequence[int]) -> Placement:
    """Equal shares over ``nodes`` (plain round-robin interleave).

    >>> interleave([0, 2, 3]).fraction(2)
    0.3333333333333333
    """
    return as_placement([(node, 1.0) for node in nodes])
