"""Placement policies: pure functions from host tensor items, tiers and budgets to a placement per
item (local_only, naive_interleave, and the paper's latency-first greedy cxl_aware). No memory is
touched here and no machine is read: callers pass the tiers and budgets in.

Items (TensorGroup) are a training step's (offload.planning.host_groups: the paper's seven, Adam
momentum, Adam variance, master grads, master weights, compute weights, activation checkpoints,
compute grads, each placed on its own as the paper's code places them) or a decode's KV cache
(offload.planning.host_groups.kv_cache_group). Below, "group" means one such item. The KV cache is a GPU read stream, as the compute weights are, and
the rules treat it the same: DRAM while it fits, then DRAM plus every card, then the cards alone.
Read streams tolerate CXL while the devices they are striped over read at least as fast as the
PCIe link; on the paper's machine the greedy only leaves DRAM out when no DRAM is left, where one
card (49.8 GiB/s of H2D) is about 4% short of the link and two cover it.

Accounting (how a placement is charged to the budgets): a group's bytes are split over its nodes
by :func:`split_nbytes` (exact integers that add up to the group). For ``cxl_aware`` the paper's
rule is applied literally: a group *fits* when its whole size is at most what is left of the local
budget. In the "some local left but not enough" branch the group is interleaved round-robin (0/1
weights) over local + all k CXL nodes, so each node is charged nbytes/(k+1); when that local share
is more than what is left of local, local is charged exactly what is left and the rest is split
evenly over the k CXL nodes. That is the accounting of the authors' public implementation
(``min(local_left, n // (1 + k))`` on local, the remainder on CXL), where the kernel's interleave
policy spills pages off the capped local node; our buffers bind every chunk strictly, so the
placement returned for such a group carries those byte weights instead of claiming an even split
that would overrun local DRAM. After it, no local is left and later groups are striped over CXL.
No policy ever returns a plan that passes a node's budget: it raises BudgetExceededError instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from allocators.errors import BudgetExceededError, ConfigError, PlacementError
from allocators.placement import Placement, as_placement, interleave
from allocators.striping import split_nbytes
from allocators.tensor_classes import TensorClass, TensorGroup
from allocators.topology import Tiers
from allocators.units import format_bytes, parse_size

if TYPE_CHECKING:
    import pandas as pd

# The tiers a budget names, nearest first (the order usage rows, tables and messages list them in).
TierName = Literal["dram", "remote_dram", "cxl"]
TIER_NAMES: tuple[TierName, ...] = get_args(TierName)
# Every placement policy a user can name: the three POLICIES below, and "planned", which
# offload.planning implements because it needs the step simulator.
PolicyName = Literal["local_only", "naive_interleave", "cxl_aware", "planned"]
POLICY_NAMES: tuple[PolicyName, ...] = get_args(PolicyName)
Rule = Literal["local", "interleave", "cxl_stripe"]

BudgetValue = int | float | str
BudgetSpec = Mapping[str, BudgetValue | Mapping[int, BudgetValue]]


@dataclass(frozen=True)
class Budgets:
    """Bytes each node may hold, and the tier each budgeted node belongs to.

    ``declared`` keeps the tier totals as the user wrote them (in bytes), for messages and tables;
    a tier with no node on this machine keeps its declared total but budgets no node.
    ``from_capacity`` names the tiers the user did not name, budgeted at their nodes' capacity.

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> cxl = [NumaNode(id=i, kind="cxl", cpus=(), total_bytes=1 << 40, free_bytes=1 << 40)
    ...        for i in (1, 2)]
    >>> tiers = Tiers(hbm=(), local_dram=(dram,), remote_dram=(), cxl=tuple(cxl))
    >>> parse_budgets({"dram": "64GiB", "cxl": "10GB"}, tiers).node_nbytes
    {0: 68719476736, 1: 5000000000, 2: 5000000000}
    """

    node_nbytes: dict[int, int]
    node_tier: dict[int, TierName]
    declared: dict[TierName, int]
    from_capacity: tuple[TierName, ...] = ()

    def tier_nbytes(self, tier: TierName) -> int:
        """Total budget of the nodes of ``tier`` on this machine."""
        return sum(n for node, n in self.node_nbytes.items() if self.node_tier[node] == tier)

    def describe(self) -> str:
        """One line naming every tier's budget and its per-node split, for error messages."""
        parts = []
        for tier, total in self.declared.items():
            nodes = [node for node, t in self.node_tier.items() if t == tier]
            split = ", ".join(f"node {n}: {format_bytes(self.node_nbytes[n])}" for n in nodes)
            origin = "capacity, not named; " if tier in self.from_capacity else ""
            parts.append(f"{tier} = {format_bytes(total)} ({origin}{split or 'no such node here'})")
        return "; ".join(parts)


def parse_budgets(budgets: BudgetSpec | Budgets, tiers: Tiers) -> Budgets:
    """Read budgets per tier, e.g. ``{"dram": "64GiB", "cxl": "256GiB"}``, into bytes per node.

    ``"dram"`` is local DRAM, ``"cxl"`` the total over all CXL nodes, ``"remote_dram"`` (optional)
    DRAM on other sockets. A total is split evenly over the tier's nodes; a dict such as
    ``{"cxl": {2: "64GiB", 3: "32GiB"}}`` gives each node its own budget (nodes left out get 0).
    A tier that is not named keeps its capacity: each of its nodes may hold its total bytes (name
    it with 0 to keep data off it).

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 38, free_bytes=1 << 38)
    >>> budgets = parse_budgets({"dram": "1GiB"}, Tiers((), (dram,), (), (cxl,)))
    >>> budgets.node_nbytes, budgets.from_capacity
    ({0: 1073741824, 1: 274877906944}, ('cxl',))
    """
    if isinstance(budgets, Budgets):
        return budgets
    if not isinstance(budgets, Mapping):
        raise ConfigError(
            f"budgets = {budgets!r} is not a mapping; write {{'dram': '64GiB', 'cxl': '256GiB'}}"
        )
    tiers_of = {"dram": tiers.local_dram, "cxl": tiers.cxl, "remote_dram": tiers.remote_dram}
    tier_nodes = {tier: tuple(n.id for n in nodes) for tier, nodes in tiers_of.items()}
    node_nbytes: dict[int, int] = {}
    node_tier: dict[int, TierName] = {}
    declared: dict[TierName, int] = {}
    for key, value in budgets.items():
        if key not in TIER_NAMES:
            raise ConfigError(
                f"budget key {key!r} is not a tier; write one of {', '.join(map(repr, TIER_NAMES))}"
            )
        nodes = tier_nodes[key]
        if isinstance(value, Mapping):
            per_node = {}
            for node, size in value.items():
                if node not in nodes:
                    raise ConfigError(
                        f"budget {key!r} names node {node!r}, which is not a {key} node here; "
                        f"{key} nodes: {list(nodes)}"
                    )
                per_node[node] = parse_size(size, what=f"budget {key!r} for node {node}")
            per_node = {node: per_node.get(node, 0) for node in nodes}
            declared[key] = sum(per_node.values())
        else:
            declared[key] = parse_size(value, what=f"budget {key!r}")
            per_node = split_nbytes(declared[key], interleave(nodes)) if nodes else {}
        node_nbytes.update(per_node)
        node_tier.update({node: key for node in nodes})
    from_capacity = tuple(t for t in TIER_NAMES if t not in budgets and tiers_of[t])
    for tier in from_capacity:
        node_nbytes.update({node.id: node.total_bytes for node in tiers_of[tier]})
        node_tier.update({node.id: tier for node in tiers_of[tier]})
        declared[tier] = sum(node.total_bytes for node in tiers_of[tier])
    return Budgets(node_nbytes, node_tier, declared, from_capacity)


def parse_budget_args(items: Sequence[str], *, what: str = "--budget") -> dict[TierName, int]:
    """Read budgets written as text, ``TIER=SIZE`` each, into bytes per tier.

    Every command line's ``--budget`` (repeatable) and ``OFFLOAD_BUDGETS`` (comma-separated) use
    this one reader. It checks syntax only (the form, the tier name, the size, a tier given twice);
    what a tier's budget means on a machine is :func:`parse_budgets`'s business.

    >>> parse_budget_args(["dram=64GiB", "cxl=256GiB"]) == {"dram": 64 << 30, "cxl": 256 << 30}
    True
    >>> parse_budget_args(["dram=1GiB,cxl=2GiB"], what="OFFLOAD_BUDGETS")["cxl"] == 2 << 30
    True
    """
    budgets: dict[TierName, int] = {}
    for item in (part for text in items for part in text.split(",")):
        tier, sep, size = (s.strip() for s in item.partition("="))
        if not sep or not tier or not size:
            raise ConfigError(
                f"{what} {item.strip()!r} is not TIER=SIZE; write e.g. {what} dram=64GiB"
            )
        if tier not in TIER_NAMES:
            raise ConfigError(
                f"{what} {item.strip()!r}: {tier!r} is not a tier; write one of "
                f"{', '.join(TIER_NAMES)}, e.g. {what} dram=64GiB"
            )
        if tier in budgets:
            raise ConfigError(f"{what} gives tier {tier!r} twice; give each tier once")
        budgets[tier] = parse_size(size, what=f"{what} {tier}")
    return budgets


@dataclass(frozen=True)
class GroupPlacement:
    """Where one group goes: its placement, the exact bytes per node, and which rule chose it."""

    group: TensorGroup
    placement: Placement
    nbytes_per_node: dict[int, int]
    rule: Rule


@dataclass(frozen=True)
class PolicyResult:
    """A policy's plan: one GroupPlacement per group, in the order the groups were given.

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> weights = TensorGroup("compute_params", ("params",), 2000, False, ())
    >>> plan = local_only([weights], Tiers((), (dram,), (), ()), {"dram": "1MiB"})
    >>> plan.placements["compute_params"].nodes, plan.by_class()["params"].nodes
    ((0,), (0,))
    """

    policy: str
    groups: tuple[GroupPlacement, ...]
    budgets: Budgets

    @property
    def placements(self) -> dict[str, Placement]:
        return {g.group.name: g.placement for g in self.groups}

    @property
    def nbytes_per_node(self) -> dict[str, dict[int, int]]:
        return {g.group.name: dict(g.nbytes_per_node) for g in self.groups}

    def by_class(self) -> dict[TensorClass, Placement]:
        """The placement of every tensor class an item holds, as TieredAllocator takes it.

        A class held by one item gets that item's placement; one held by several (Adam's
        momentum and variance are both ``optimizer_state``) gets their bytes per node added up,
        so each node keeps the share of the class's bytes the items gave it.

        >>> from allocators.topology import NumaNode, Tiers
        >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
        >>> cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 40, free_bytes=1 << 40)
        >>> state = [TensorGroup(n, ("optimizer_state",), 100, True, ()) for n in ("m", "v")]
        >>> plan = cxl_aware(state, Tiers((), (dram,), (), (cxl,)), {"dram": 150, "cxl": 100})
        >>> plan.nbytes_per_node, plan.by_class()["optimizer_state"].shares
        ({'m': {0: 100}, 'v': {0: 50, 1: 50}}, ((0, 0.75), (1, 0.25)))
        """
        holders: dict[TensorClass, list[GroupPlacement]] = {}
        for item in self.groups:
            for cls in item.group.tensor_classes:
                holders.setdefault(cls, []).append(item)
        return {cls: _merged_placement(items) for cls, items in holders.items()}

    def table(self) -> pd.DataFrame:
        """Bytes per group (rows) and node (columns, ``"node 2 (cxl)"``), with a total row."""
        import pandas as pd  # deferred: `import allocators` stays light

        nodes = sorted(
            {n for g in self.groups for n in g.nbytes_per_node} | set(self.budgets.node_nbytes)
        )
        columns = [f"node {n} ({self.budgets.node_tier.get(n, 'unbudgeted')})" for n in nodes]
        rows = [[g.nbytes_per_node.get(n, 0) for n in nodes] for g in self.groups]
        frame = pd.DataFrame(rows, index=[g.group.name for g in self.groups], columns=columns)
        frame.loc["total"] = frame.sum()
        frame.loc["budget"] = [self.budgets.node_nbytes.get(n, 0) for n in nodes]
        return frame


def _merged_placement(items: Sequence[GroupPlacement]) -> Placement:
    if len(items) == 1:
        return items[0].placement
    per_node: dict[int, int] = {}
    for item in items:
        for node, nbytes in item.nbytes_per_node.items():
            per_node[node] = per_node.get(node, 0) + nbytes
    shares = [(node, nbytes) for node, nbytes in sorted(per_node.items()) if nbytes > 0]
    # Items of no bytes at all still need a home: the first one's.
    return as_placement(shares) if shares else items[0].placement


class _Ledger:
    """What is left on each node while a policy walks the groups; refuses any overrun."""

    def __init__(self, policy: str, budgets: Budgets):
        self.policy = policy
        self.budgets = budgets
        self.left = dict(budgets.node_nbytes)

    def take(self, group: TensorGroup, per_node: Mapping[int, int]) -> None:
        for node, nbytes in per_node.items():
            left = self.left.get(node, 0)
            if nbytes > left:
                tier = self.budgets.node_tier.get(node)
                budget = self.budgets.node_nbytes.get(node, 0)
                raise BudgetExceededError(
                    f"{self.policy}: group {group.name!r} ({format_bytes(group.nbytes)}, "
                    f"{group.nbytes} bytes) needs {format_bytes(nbytes)} on node {node} "
                    f"({tier or 'no budget'}), but only {format_bytes(left)} of that node's "
                    f"{format_bytes(budget)} is left; budgets: {self.budgets.describe()}. "
                    + (
                        f"Raise budget {tier!r}"
                        if tier
                        else f"Node {node} has no budget: give its tier one (e.g. 'cxl': '256GiB')"
                    )
                    + ", shorten the sequence or batch, or choose another policy"
                )
        for node, nbytes in per_node.items():
            self.left[node] -= nbytes


def _local_node(tiers: Tiers) -> int:
    # The paper has one local node; with several equally near ones the first is the local one.
    if not tiers.local_dram:
        raise PlacementError(
            "these tiers have no local DRAM node; a policy needs one (check the topology)"
        )
    return tiers.local_dram[0].id


def _result(policy: str, budgets: Budgets, items: list[GroupPlacement]) -> PolicyResult:
    return PolicyResult(policy=policy, groups=tuple(items), budgets=budgets)


def local_only(
    groups: Sequence[TensorGroup], tiers: Tiers, budgets: BudgetSpec | Budgets
) -> PolicyResult:
    """Every group on local DRAM (the paper's reference); raises if local DRAM is too small.

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> g = TensorGroup("compute_params", ("params",), 100, False, ())
    >>> local_only([g], Tiers((), (dram,), (), ()), {"dram": 100}).nbytes_per_node
    {'compute_params': {0: 100}}
    """
    budget = parse_budgets(budgets, tiers)
    local = _local_node(tiers)
    ledger = _Ledger("local_only", budget)
    items = []
    for group in groups:
        per_node = {local: group.nbytes}
        ledger.take(group, per_node)
        items.append(GroupPlacement(group, as_placement(local), per_node, "local"))
    return _result("local_only", budget, items)


def naive_interleave(
    groups: Sequence[TensorGroup], tiers: Tiers, budgets: BudgetSpec | Budgets
) -> PolicyResult:
    """Every group round-robin over local + all CXL nodes (the paper's baseline).

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> g = TensorGroup("compute_params", ("params",), 100, False, ())
    >>> naive_interleave([g], Tiers((), (dram,), (), (cxl,)), {"dram": 50, "cxl": 50}).nbytes_per_node
    {'compute_params': {0: 50, 1: 50}}
    """
    budget = parse_budgets(budgets, tiers)
    placement = interleave([_local_node(tiers), *(n.id for n in tiers.cxl)])
    ledger = _Ledger("naive_interleave", budget)
    items = []
    for group in groups:
        per_node = split_nbytes(group.nbytes, placement)
        ledger.take(group, per_node)
        items.append(GroupPlacement(group, placement, per_node, "interleave"))
    return _result("naive_interleave", budget, items)


def _no_cxl(group: TensorGroup, local_left: int, budgets: Budgets) -> BudgetExceededError:
    return BudgetExceededError(
        f"cxl_aware: group {group.name!r} ({format_bytes(group.nbytes)}, {group.nbytes} bytes) "
        f"does not fit in the {format_bytes(local_left)} of local DRAM left and this machine has "
        f"no CXL node to take the rest; budgets: {budgets.describe()}. Raise budget 'dram' or "
        "use a topology with CXL nodes"
    )


def cxl_aware(
    groups: Sequence[TensorGroup], tiers: Tiers, budgets: BudgetSpec | Budgets
) -> PolicyResult:
    """The paper's latency-first greedy: visit groups in priority order and, for each,

    - it fits in what is left of local: all on local;
    - some local is left but not enough: interleave (0/1) over local + all k CXL nodes, the local
      share capped at what is left (see the module docstring for the accounting);
    - no local left: stripe evenly over the k CXL nodes.

    Raises BudgetExceededError naming the group, the request and the budgets when a CXL node's
    budget would be passed.

    >>> from allocators.topology import NumaNode, Tiers
    >>> dram = NumaNode(id=0, kind="dram", cpus=(0,), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> cxl = NumaNode(id=1, kind="cxl", cpus=(), total_bytes=1 << 40, free_bytes=1 << 40)
    >>> groups = [TensorGroup(name, (), 100, False, ()) for name in ("a", "b", "c")]
    >>> plan = cxl_aware(groups, Tiers((), (dram,), (), (cxl,)), {"dram": 130, "cxl": 200})
    >>> [(g.rule, g.nbytes_per_node) for g in plan.groups]
    [('local', {0: 100}), ('interleave', {0: 30, 1: 70}), ('cxl_stripe', {1: 100})]
    >>> kv = TensorGroup("kv_cache", ("kv_cache",), 256, False, ())
    >>> plan = cxl_aware([kv], Tiers((), (dram,), (), (cxl,)), {"dram": 100, "cxl": 200})
    >>> plan.groups[0].rule, plan.by_class()["kv_cache"].shares
    ('interleave', ((0, 0.390625), (1, 0.609375)))
    """
    budget = parse_budgets(budgets, tiers)
    local = _local_node(tiers)
    cxl = [n.id for n in tiers.cxl]
    ledger = _Ledger("cxl_aware", budget)
    items = []
    for group in groups:
        local_left = ledger.left.get(local, 0)
        rule: Rule
        if group.nbytes <= local_left:
            rule, placement = "local", as_placement(local)
            per_node = {local: group.nbytes}
        elif not cxl:
            raise _no_cxl(group, local_left, budget)
        elif local_left > 0:
            rule, placement = "interleave", interleave([local, *cxl])
            per_node = split_nbytes(group.nbytes, placement)
            if per_node[local] > local_left:
                per_node = {
                    local: local_left,
                    **split_nbytes(group.nbytes - local_left, interleave(cxl)),
                }
                placement = as_placement([(n, b) for n, b in per_node.items() if b > 0])
        else:
            rule, placement = "cxl_stripe", interleave(cxl)
            per_node = split_nbytes(group.nbytes, placement)
        ledger.take(group, per_node)
        items.append(GroupPlacement(group, placement, per_node, rule))
    return _result("cxl_aware", budget, items)


Policy = Callable[[Sequence[TensorGroup], Tiers, "BudgetSpec | Budgets"], PolicyResult]

POLICIES: dict[str, Policy] = {
    "local_only": local_only,
    "naive_interleave": naive_interleave,
    "cxl_aware": cxl_aware,
}


def get_policy(name: str) -> Policy:
    """Return the policy called ``name``; the error lists the valid names.

    >>> get_policy("cxl_aware").__name__
    'cxl_aware'
    """
    if name not in POLICIES:
        raise ConfigError(f"policy {name!r} is not known; write one of {', '.join(POLICIES)}")
    return POLICIES[name]
