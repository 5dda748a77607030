"""The planner: a placement per host item and the predicted phase times, for any policy, and
our ``planned`` policy, which searches DRAM:CXL ratios and CXL device sets for the shortest step;
for a decode (:func:`plan_decode`), the same for the KV cache against the predicted decode step.

It decides and predicts only; it must not allocate memory or read the machine (callers pass rates).

``planned`` places the same items as the paper's policies (the paper's seven, or those our runtime
allocates) and starts from the best feasible plan of those policies (so it is never worse than
them in the simulator), then improves it by local search: move a chunk of one item's bytes between
local DRAM and CXL, or trade a chunk of DRAM between two groups, or change which CXL devices a
group's CXL share is striped over (weighted by each device's rate in the group's weak direction:
D2H for gradients and activations, since writes into CXL are the slow direction). Every candidate
is charged to the budgets exactly as the allocator will charge it; one that passes a budget is
never taken, so a plan never exceeds a budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from allocators.errors import BudgetExceededError, OffloadError
from allocators.placement import Placement, as_placement
from allocators.policies import (
    POLICIES,
    POLICY_NAMES,
    Budgets,
    BudgetSpec,
    GroupPlacement,
    PolicyResult,
    parse_budgets,
)
from allocators.striping import split_nbytes
from allocators.tensor_classes import TensorGroup
from allocators.topology import Tiers
from allocators.units import format_bytes
from offload.planning.host_groups import merged_groups
from offload.planning.model_shapes import ModelShape
from offload.planning.simulator.decode import (
    DecodeConfig,
    DecodePrediction,
    kv_cache_group_for,
    simulate_decode,
)
from offload.planning.simulator.rates import SimRates
from offload.planning.simulator.step import (
    DEEPSPEED_ZERO3,
    StepConfig,
    StepPrediction,
    simulate_step,
)


class PlanError(OffloadError, ValueError):
    """A plan was asked for with a setting the planner cannot use; the message says what to write."""


# Search granularity: the smallest chunk moved is this fraction of the largest group.
_FINEST_CHUNK = 1 / 512


@dataclass(frozen=True)
class Plan:
    """A policy's placement per group and the simulator's prediction for it.

    ``result`` has the same shape whatever the policy (``result.by_class()`` is what the
    allocator takes); ``prediction`` holds forward/backward/step seconds and tokens/s.
    """

    policy: str
    result: PolicyResult
    prediction: StepPrediction

    @property
    def placements(self) -> dict[str, Placement]:
        return self.result.placements


@dataclass(frozen=True)
class DecodePlan:
    """A policy's kv_cache placement for a decode and the decode simulator's prediction for it.

    ``placement`` is what TieredAllocator takes for class ``kv_cache``; ``prediction`` holds the
    DMA-bound decode step (seconds, tokens/s, bottleneck).
    """

    policy: str
    result: PolicyResult
    prediction: DecodePrediction

    @property
    def placement(self) -> Placement:
        return self.result.placements["kv_cache"]


@dataclass(frozen=True)
class _Context:
    rates: SimRates
    local: int
    cxl: tuple[int, ...]
    budgets: Budgets


# Predicted seconds of a whole plan: the search's objective (a training step or a decode step).
_Seconds = Callable[[PolicyResult], float]


def _weak_direction_rate(ctx: _Context, group: TensorGroup, node: int) -> float:
    """The rate that matters for a group on a node: CPU for optimizer data, D2H for data the GPU
    writes (gradients, activations), H2D for data the GPU only reads (weights)."""
    if group.cpu_touched:
        return ctx.rates.node(node).cpu_gib_per_s
    written_by_gpu = {"grads", "activations"} & set(group.tensor_classes)
    return ctx.rates.dma_gib_per_s(node, "d2h" if written_by_gpu else "h2d")


# A group's state in the search: bytes on local DRAM and the CXL devices its rest is striped over.
_State = tuple[tuple[int, tuple[int, ...]], ...]


def _group_placement(
    ctx: _Context, group: TensorGroup, dram_nbytes: int, devices: tuple[int, ...]
) -> GroupPlacement | None:
    cxl_nbytes = group.nbytes - dram_nbytes
    if cxl_nbytes > 0 and not devices:
        return None
    weights = [(n, _weak_direction_rate(ctx, group, n)) for n in devices] if cxl_nbytes else []
    per_node = {ctx.local: dram_nbytes} if dram_nbytes else {}
    if weights:
        per_node.update(split_nbytes(cxl_nbytes, as_placement(weights)))
    per_node = {n: b for n, b in per_node.items() if b > 0}
    if not per_node:  # an empty group still needs a home; it costs nothing
        per_node = {ctx.local: 0}
        placement = as_placement(ctx.local)
    else:
        placement = as_placement(list(per_node.items()))
        # Charge what the allocator will charge: the split of the normalised placement.
        per_node = split_nbytes(group.nbytes, placement)
    rule = "local" if set(per_node) == {ctx.local} else "interleave"
    if ctx.local not in per_node:
        rule = "cxl_stripe"
    return GroupPlacement(group, placement, per_node, rule)


def _build(ctx: _Context, groups: Sequence[TensorGroup], state: _State) -> PolicyResult | None:
    used: dict[int, int] = {}
    items = []
    for group, (dram_nbytes, devices) in zip(groups, state, strict=True):
        item = _group_placement(ctx, group, dram_nbytes, devices)
        if item is None:
            return None
        for node, nbytes in item.nbytes_per_node.items():
            used[node] = used.get(node, 0) + nbytes
        items.append(item)
    if any(nbytes > ctx.budgets.node_nbytes.get(node, 0) for node, nbytes in used.items()):
        return None
    return PolicyResult(policy="planned", groups=tuple(items), budgets=ctx.budgets)


def _state_of(ctx: _Context, result: PolicyResult) -> _State:
    return tuple(
        (
            item.nbytes_per_node.get(ctx.local, 0),
            tuple(n for n in ctx.cxl if item.nbytes_per_node.get(n, 0) > 0) or ctx.cxl,
        )
        for item in result.groups
    )


def _device_sets(cxl: tuple[int, ...]) -> list[tuple[int, ...]]:
    # Nearest-first prefixes, and each device alone: enough to choose how many cards to use.
    sets = {cxl[:k] for k in range(1, len(cxl) + 1)} | {(n,) for n in cxl}
    return sorted(sets, key=lambda s: (len(s), s))


def _neighbours(
    groups: Sequence[TensorGroup], state: _State, chunk: int, cxl: tuple[int, ...]
) -> list[_State]:
    out: list[_State] = []
    for i, group in enumerate(groups):
        dram, devices = state[i]
        for new_dram in (dram + chunk, dram - chunk):
            if 0 <= new_dram <= group.nbytes:
                out.append(state[:i] + ((new_dram, devices),) + state[i + 1 :])
        for devices_new in _device_sets(cxl):
            if devices_new != devices:
                out.append(state[:i] + ((dram, devices_new),) + state[i + 1 :])
        # Trade: group i gives `chunk` of DRAM to group j.
        for j, other in enumerate(groups):
            other_dram = state[j][0]
            if j == i or dram < chunk or other_dram + chunk > other.nbytes:
                continue
            swapped = list(state)
            swapped[i] = (dram - chunk, devices)
            swapped[j] = (other_dram + chunk, state[j][1])
            out.append(tuple(swapped))
    return out


def _search(
    ctx: _Context, groups: Sequence[TensorGroup], start: PolicyResult, seconds: _Seconds
) -> PolicyResult:
    best, best_s = start, seconds(start)
    state = _state_of(ctx, start)
    chunk = max(g.nbytes for g in groups) // 4
    finest = max(1, int(max(g.nbytes for g in groups) * _FINEST_CHUNK))
    while chunk >= finest:
        improved = False
        for candidate in _neighbours(groups, state, chunk, ctx.cxl):
            result = _build(ctx, groups, candidate)
            if result is None:
                continue
            candidate_s = seconds(result)
            if candidate_s < best_s * (1 - 1e-9):
                best, best_s, state, improved = result, candidate_s, candidate, True
        if not improved:
            chunk //= 2
    return best


def _fill_in_order(ctx: _Context, groups: Sequence[TensorGroup]) -> PolicyResult | None:
    """Local DRAM in priority order, the rest over CXL in proportion to what each card has left:
    a start that exists whenever the groups fit at all, even where the paper's even split does not."""
    left = dict(ctx.budgets.node_nbytes)
    items = []
    for group in groups:
        dram = min(group.nbytes, left.get(ctx.local, 0))
        rest = group.nbytes - dram
        free = [(n, left.get(n, 0)) for n in ctx.cxl if left.get(n, 0) > 0]
        if rest and sum(b for _, b in free) < rest:
            return None
        shares = ([(ctx.local, dram)] if dram else []) + (
            list(split_nbytes(rest, as_placement(free)).items()) if rest else []
        )
        shares = [(n, b) for n, b in shares if b > 0] or [(ctx.local, 1)]
        placement = as_placement(shares)
        per_node = split_nbytes(group.nbytes, placement)
        if any(b > left.get(n, 0) for n, b in per_node.items()):
            return None
        for n, b in per_node.items():
            left[n] -= b
        rule = "local" if placement.nodes == (ctx.local,) else "interleave"
        items.append(GroupPlacement(group, placement, per_node, rule))
    return PolicyResult(policy="planned", groups=tuple(items), budgets=ctx.budgets)


def planned(
    groups: Sequence[TensorGroup],
    tiers: Tiers,
    budgets: BudgetSpec | Budgets,
    *,
    shape: ModelShape,
    batch: int,
    seq: int,
    rates: SimRates,
    config: StepConfig = DEEPSPEED_ZERO3,
) -> PolicyResult:
    """Our policy: the placement with the shortest predicted step within the budgets.

    Raises BudgetExceededError when no placement fits (the groups need more than the budgets).

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.host_groups import host_tensor_groups
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import sim_rates
    >>> topo = load_declared("paper-1aic"); shape = MODELS["llama-1.1b"]
    >>> groups = host_tensor_groups(shape.n_params, 1, 4096, shape.hidden, shape.layers)
    >>> result = planned(groups, topo.tiers, {"dram": "16GiB", "cxl": "64GiB"}, shape=shape,
    ...                  batch=1, seq=4096, rates=sim_rates(topo))
    >>> critical = [g for g in result.groups if g.group.group_name == "latency_critical"]
    >>> local = sum(g.nbytes_per_node.get(0, 0) for g in critical)
    >>> round(local / sum(g.group.nbytes for g in critical), 2)  # DRAM:CXL about 4:1, as their CPU rates
    0.82
    """

    def seconds(result: PolicyResult) -> float:
        return simulate_step(shape, batch, seq, result.by_class(), rates, config).total_s

    return _best_plan(groups, tiers, budgets, rates, seconds, "the sequence or the batch")


def _expanded(
    ctx: _Context, groups: Sequence[TensorGroup], coarse: PolicyResult
) -> PolicyResult | None:
    """``coarse`` (a plan of the merged groups) as a plan of ``groups``: each item placed as its
    group; None when the items' rounding would pass a budget."""
    by_group = {item.group.name: item for item in coarse.groups}
    used: dict[int, int] = {}
    items = []
    for group in groups:
        outer = by_group[group.group_name]
        per_node = split_nbytes(group.nbytes, outer.placement)
        for node, nbytes in per_node.items():
            used[node] = used.get(node, 0) + nbytes
        items.append(GroupPlacement(group, outer.placement, per_node, outer.rule))
    if any(nbytes > ctx.budgets.node_nbytes.get(node, 0) for node, nbytes in used.items()):
        return None
    return PolicyResult(policy="planned", groups=tuple(items), budgets=ctx.budgets)


def _searched(
    ctx: _Context,
    groups: Sequence[TensorGroup],
    tiers: Tiers,
    seconds: _Seconds,
    more_starts: Sequence[PolicyResult] = (),
) -> PolicyResult | None:
    """The fastest feasible start (the paper's policies, an in-order fill, ``more_starts``),
    improved by local search; None when nothing fits."""
    starts = list(more_starts)
    for policy in POLICIES.values():
        try:
            starts.append(policy(groups, tiers, ctx.budgets))
        except BudgetExceededError:
            continue
    fill = _fill_in_order(ctx, groups)
    if fill is not None:
        starts.append(fill)
    if not starts:
        return None
    start = min(starts, key=seconds)
    start = PolicyResult(policy="planned", groups=start.groups, budgets=ctx.budgets)
    return _search(ctx, groups, start, seconds)


def _best_plan(
    groups: Sequence[TensorGroup],
    tiers: Tiers,
    budgets: BudgetSpec | Budgets,
    rates: SimRates,
    seconds: _Seconds,
    shrink: str,
) -> PolicyResult:
    """The search behind ``planned`` and ``planned_decode``, item by item, from the fastest
    feasible start: the paper's policies over the items, an in-order fill, and the best plan of
    the merged groups (items of one paper group placed alike, searched the same way first: a
    coarser search that reaches plans the item-wise one can miss)."""
    budget = parse_budgets(budgets, tiers)
    ctx = _Context(
        rates=rates,
        local=tiers.local_dram[0].id if tiers.local_dram else -1,
        cxl=tuple(n.id for n in tiers.cxl),
        budgets=budget,
    )
    if ctx.local < 0:
        raise BudgetExceededError("planned: these tiers have no local DRAM node to plan around")
    merged = merged_groups(groups)
    coarse = _searched(ctx, merged, tiers, seconds) if len(merged) < len(groups) else None
    expanded = None if coarse is None else _expanded(ctx, groups, coarse)
    best = _searched(ctx, groups, tiers, seconds, [expanded] if expanded else [])
    if best is None:
        need = sum(g.nbytes for g in groups)
        raise BudgetExceededError(
            f"planned: the groups need {format_bytes(need)} ({need} bytes) in all but the budgets "
            f"hold {format_bytes(sum(budget.node_nbytes.values()))} ({budget.describe()}); "
            f"raise a budget, shorten {shrink}"
        )
    return best


def plan(
    groups: Sequence[TensorGroup],
    tiers: Tiers,
    budgets: BudgetSpec | Budgets,
    policy: str,
    *,
    shape: ModelShape,
    batch: int,
    seq: int,
    rates: SimRates,
    config: StepConfig = DEEPSPEED_ZERO3,
) -> Plan:
    """Place ``groups`` with ``policy`` (one of allocators.policies.POLICY_NAMES) and predict the step.

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.host_groups import host_tensor_groups
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import sim_rates
    >>> topo = load_declared("paper-2aic"); shape = MODELS["llama-1.1b"]
    >>> groups = host_tensor_groups(shape.n_params, 1, 4096, shape.hidden, shape.layers)
    >>> p = plan(groups, topo.tiers, {"dram": "64GiB"}, "local_only", shape=shape, batch=1,
    ...          seq=4096, rates=sim_rates(topo))
    >>> p.prediction.bottlenecks["step"]
    'node 0'
    """
    if policy not in POLICY_NAMES:
        raise PlanError(f"policy {policy!r} is not known; write one of {', '.join(POLICY_NAMES)}")
    if policy == "planned":
        result = planned(
            groups, tiers, budgets, shape=shape, batch=batch, seq=seq, rates=rates, config=config
        )
    else:
        result = POLICIES[policy](groups, tiers, budgets)
    prediction = simulate_step(shape, batch, seq, result.by_class(), rates, config)
    return Plan(policy=policy, result=result, prediction=prediction)


def predicted_phases(prediction: StepPrediction) -> Mapping[str, float]:
    """Phase name -> seconds, in the order a table shows them.

    >>> predicted_phases(StepPrediction(1.0, 2.0, 0.5, 0.0, 10, {}))["total"]
    3.5
    """
    return {
        "forward": prediction.forward_s,
        "backward": prediction.backward_s,
        "step": prediction.step_s,
        "overhead": prediction.overhead_s,
        "total": prediction.total_s,
    }


def planned_decode(
    shape: ModelShape,
    tiers: Tiers,
    budgets: BudgetSpec | Budgets,
    *,
    context_tokens: int,
    batch: int,
    rates: SimRates,
    config: DecodeConfig | None = None,
) -> PolicyResult:
    """Our policy for a decode: the kv_cache placement with the shortest predicted decode step
    (offload.planning.simulator.decode) within the budgets, searched as :func:`planned` searches.

    Raises BudgetExceededError, with the bytes needed and the budgets, when the cache cannot fit.

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import sim_rates
    >>> topo = load_declared("paper-1aic")
    >>> result = planned_decode(MODELS["qwen2.5-7b"], topo.tiers, {"dram": "1GiB", "cxl": "64GiB"},
    ...                         context_tokens=131072, batch=1, rates=sim_rates(topo))
    >>> print(result.placements["kv_cache"])  # the 1 GiB of DRAM keeps the card under the link
    node0:0.143 + node1:0.857
    """
    config = config or DecodeConfig()
    group = kv_cache_group_for(shape, context_tokens, batch, config)

    def seconds(result: PolicyResult) -> float:
        placement = result.placements["kv_cache"]
        return simulate_decode(shape, context_tokens, batch, placement, rates, config).step_s

    return _best_plan([group], tiers, budgets, rates, seconds, "the context or the batch")


def plan_decode(
    shape: ModelShape,
    tiers: Tiers,
    budgets: BudgetSpec | Budgets,
    policy: str,
    *,
    context_tokens: int,
    batch: int = 1,
    rates: SimRates,
    config: DecodeConfig | None = None,
) -> DecodePlan:
    """Place the KV cache of a decode up to ``context_tokens`` with ``policy`` (one of
    allocators.policies.POLICY_NAMES) and predict the decode step's DMA time.

    The cache is one group, ``kv_cache`` (offload.planning.simulator.decode.kv_cache_group_for); the
    paper's policies treat it as they treat the compute weights, another GPU read stream.

    >>> from allocators.declared_topology import load_declared
    >>> from offload.planning.model_shapes import MODELS
    >>> from offload.planning.simulator.rates import sim_rates
    >>> topo = load_declared("paper-2aic")
    >>> p = plan_decode(MODELS["qwen2.5-7b"], topo.tiers, {"dram": "4GiB", "cxl": "64GiB"},
    ...                 "cxl_aware", context_tokens=131072, rates=sim_rates(topo))
    >>> print(p.placement)
    node0:0.333 + node1:0.333 + node2:0.333
    >>> p.prediction.bottleneck
    'link h2d'
    """
    if policy not in POLICY_NAMES:
        raise PlanError(f"policy {policy!r} is not known; write one of {', '.join(POLICY_NAMES)}")
    config = config or DecodeConfig()
    if policy == "planned":
        result = planned_decode(
            shape,
            tiers,
            budgets,
            context_tokens=context_tokens,
            batch=batch,
            rates=rates,
            config=config,
        )
    else:
        group = kv_cache_group_for(shape, context_tokens, batch, config)
        result = POLICIES[policy]([group], tiers, budgets)
    placement = result.placements["kv_cache"]
    prediction = simulate_decode(shape, context_tokens, batch, placement, rates, config)
    return DecodePlan(policy=policy, result=result, prediction=prediction)
