"""The host items a model and micro-batch need, sized from its shape: the paper's seven (its
runtime) and the ones offload.enable() allocates, and the KV cache of a decode. Sizes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from allocators.errors import ConfigError
from allocators.tensor_classes import (
    STATE_NBYTES_PER_PARAM,
    OptimizerName,
    TensorClass,
    TensorGroup,
)

if TYPE_CHECKING:
    from offload.planning.activation_bytes import ActivationEstimate


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} = {value!r} must be a positive integer (e.g. {what}=4096)")
    return value


def _params_and_checkpoints(
    n_params: int,
    batch: int,
    seq: int,
    hidden: int,
    layers: int,
    optimizer: str,
    activations: ActivationEstimate | None = None,
) -> tuple[int, TensorGroup]:
    """The checked parameter count, and the activations group: ``activations``' host bytes when
    given, else the paper's one bf16 [b, s, h] checkpoint per layer."""
    p = _positive_int(n_params, "n_params")
    b = _positive_int(batch, "batch")
    s = _positive_int(seq, "seq")
    h = _positive_int(hidden, "hidden")
    n_layers = _positive_int(layers, "layers")
    if optimizer not in STATE_NBYTES_PER_PARAM:
        raise ConfigError(
            f"optimizer {optimizer!r} is not known; write 'adam' (also for AdamW) or 'lion'"
        )
    if activations is None:
        nbytes = 2 * b * s * h * n_layers
        parts: tuple[tuple[str, int], ...] = (("layer-input checkpoints (bf16)", nbytes),)
    else:
        nbytes = activations.host_nbytes
        parts = tuple((f"{name} ({activations.mode})", n) for name, n in activations.parts)
    # The paper's name for the group, whatever the mode fills it with: policies rank by it.
    checkpoints = TensorGroup(
        name="activation_checkpoints",
        tensor_classes=("activations",),
        nbytes=nbytes,
        cpu_touched=False,
        parts=parts,
    )
    return p, checkpoints


# The paper's group of the items the CPU optimizer reads and writes every step.
LATENCY_CRITICAL = "latency_critical"


def _optimizer_items(optimizer: str, p: int) -> tuple[TensorGroup, ...]:
    """The optimizer's fp32 state, one item per state tensor: Adam's momentum then its variance,
    Lion's momentum alone."""
    names = ("momentum",) if optimizer == "lion" else ("momentum", "variance")
    family = "lion" if optimizer == "lion" else "adam"
    return tuple(
        TensorGroup(
            name=name,
            tensor_classes=("optimizer_state",),
            nbytes=4 * p,
            cpu_touched=True,
            parts=((f"{family} {name} (fp32)", 4 * p),),
            group=LATENCY_CRITICAL,
        )
        for name in names
    )


def _master_item(name: str, cls: TensorClass, label: str, p: int) -> TensorGroup:
    return TensorGroup(
        name=name,
        tensor_classes=(cls,),
        nbytes=4 * p,
        cpu_touched=True,
        parts=((label, 4 * p),),
        group=LATENCY_CRITICAL,
    )


def host_tensor_groups(
    n_params: int,
    batch: int,
    seq: int,
    hidden: int,
    layers: int,
    optimizer: OptimizerName = "adam",
) -> tuple[TensorGroup, ...]:
    """The paper's seven host items for a model and micro-batch, in its priority order.

    The paper's greedy visits them one by one: ``momentum``, ``variance`` (Adam only), fp32
    ``master_grads`` and ``master_params`` (4P each; together the ``latency_critical`` group,
    CPU-touched), ``compute_params`` (bf16 weights, 2P), ``activation_checkpoints`` (one bf16
    [b, s, h] checkpoint per layer, 2bshL) and ``compute_grads`` (bf16 grads, 2P).
    ``kv_cache`` belongs to inference: see :func:`kv_cache_group`.

    >>> [(g.name, g.nbytes) for g in host_tensor_groups(1000, 1, 8, 4, 2)]  # doctest: +NORMALIZE_WHITESPACE
    [('momentum', 4000), ('variance', 4000), ('master_grads', 4000), ('master_params', 4000),
     ('compute_params', 2000), ('activation_checkpoints', 128), ('compute_grads', 2000)]
    >>> [g.name for g in host_tensor_groups(1000, 1, 8, 4, 2, optimizer="lion")][:2]
    ['momentum', 'master_grads']
    """
    p, activations = _params_and_checkpoints(n_params, batch, seq, hidden, layers, optimizer)
    return (
        *_optimizer_items(optimizer, p),
        _master_item("master_grads", "master_grads", "master grads (fp32)", p),
        _master_item("master_params", "master_params", "master weights (fp32)", p),
        TensorGroup(
            name="compute_params",
            tensor_classes=("params",),
            nbytes=2 * p,
            cpu_touched=False,
            parts=(("compute weights (bf16)", 2 * p),),
        ),
        activations,
        TensorGroup(
            name="compute_grads",
            tensor_classes=("grads",),
            nbytes=2 * p,
            cpu_touched=False,
            parts=(("compute grads (bf16)", 2 * p),),
        ),
    )


def runtime_tensor_groups(
    n_params: int,
    batch: int,
    seq: int,
    hidden: int,
    layers: int,
    *,
    optimizer: OptimizerName = "adam",
    grad_nbytes_per_param: int = 2,
    grad_staging: bool = False,
    optimizer_offload: bool = True,
    activations: ActivationEstimate | None = None,
) -> tuple[TensorGroup, ...]:
    """The host items offload.enable() really allocates, in the paper's priority order.

    Unlike the paper's runtime, ours keeps no fp32 master gradients (the CPU step reads the
    gradients in the dtype they land in), no host copy of the compute weights (the updated
    half-precision params are written over their own gradients) and, without gradient
    accumulation, no staging buffer. Its items, each placed on its own: ``momentum`` and
    ``variance`` (Adam; Lion: momentum alone, 4P each) and the fp32 ``master_params`` (4P), the
    ``latency_critical`` group; ``activation_checkpoints``: the host bytes of ``activations``
    (offload.planning.activation_bytes.estimate_activations, for the run's activation mode), else
    the paper's layer inputs, 2bshL; ``compute_grads``: the gradients as they land
    (``grad_nbytes_per_param`` x P), twice that with ``grad_staging`` (later micro-steps land in
    a second buffer, class ``master_grads``, before being summed). That item also names class
    ``params``: the updated half-precision params live in it.

    >>> [(g.name, g.nbytes) for g in runtime_tensor_groups(1000, 1, 8, 4, 2)]  # doctest: +NORMALIZE_WHITESPACE
    [('momentum', 4000), ('variance', 4000), ('master_params', 4000),
     ('activation_checkpoints', 128), ('compute_grads', 2000)]
    >>> [g.name for g in runtime_tensor_groups(1000, 1, 8, 4, 2, optimizer_offload=False)]
    ['activation_checkpoints']
    >>> from offload.planning.activation_bytes import estimate_activations
    >>> from offload.planning.model_shapes import ModelShape
    >>> tiny = ModelShape("tiny", 2, 4, 8, 2, 1, 2, 16)
    >>> est = estimate_activations(tiny, batch=1, seq=8, min_nbytes=0)
    >>> runtime_tensor_groups(1000, 1, 8, 4, 2, activations=est)[-2].nbytes == est.host_nbytes
    True
    """
    p, saved = _params_and_checkpoints(n_params, batch, seq, hidden, layers, optimizer, activations)
    g = _positive_int(grad_nbytes_per_param, "grad_nbytes_per_param")
    if not optimizer_offload:
        return (saved,)
    grad_parts = ((f"gradients as they land ({g} B/param)", g * p),)
    grad_classes: tuple[TensorClass, ...] = ("grads", "params", "master_grads")
    if grad_staging:
        grad_parts += (("accumulation staging", g * p),)
    return (
        *_optimizer_items(optimizer, p),
        _master_item("master_params", "master_params", "master weights (fp32)", p),
        saved,
        TensorGroup(
            name="compute_grads",
            tensor_classes=grad_classes,
            nbytes=sum(n for _, n in grad_parts),
            cpu_touched=False,
            parts=grad_parts,
        ),
    )


def nbytes_by_group(items: Sequence[TensorGroup]) -> dict[str, int]:
    """Bytes of each of the paper's groups, its items added up, in priority order.

    >>> nbytes_by_group(host_tensor_groups(1000, 1, 8, 4, 2))  # doctest: +NORMALIZE_WHITESPACE
    {'latency_critical': 16000, 'compute_params': 2000, 'activation_checkpoints': 128,
     'compute_grads': 2000}
    """
    totals: dict[str, int] = {}
    for item in items:
        totals[item.group_name] = totals.get(item.group_name, 0) + item.nbytes
    return totals


def merged_groups(items: Sequence[TensorGroup]) -> tuple[TensorGroup, ...]:
    """The paper's groups as single items: the items of each added up (classes, bytes, parts),
    as a policy that placed whole groups saw them; an item alone in its group stays as it is.

    >>> [(g.name, g.nbytes) for g in merged_groups(host_tensor_groups(1000, 1, 8, 4, 2))][:2]
    [('latency_critical', 16000), ('compute_params', 2000)]
    """
    by_group: dict[str, list[TensorGroup]] = {}
    for item in items:
        by_group.setdefault(item.group_name, []).append(item)
    return tuple(
        members[0]
        if len(members) == 1
        else TensorGroup(
            name=name,
            tensor_classes=tuple(dict.fromkeys(c for i in members for c in i.tensor_classes)),
            nbytes=sum(i.nbytes for i in members),
            cpu_touched=any(i.cpu_touched for i in members),
            parts=tuple(part for i in members for part in i.parts),
        )
        for name, members in by_group.items()
    )


def kv_cache_group(
    layers: int,
    kv_heads: int,
    head_dim: int,
    context_tokens: int,
    batch: int = 1,
    dtype_nbytes: int = 2,
) -> TensorGroup:
    """The KV cache of a decode as one group: K and V of every layer, 2 * dtype_nbytes * L * kvh
    * d * T * batch bytes (DESIGN.md's 4 L kvh d T for bf16). The GPU only reads it back (H2D, a
    read stream like the compute weights) and the CPU never touches it.

    >>> g = kv_cache_group(layers=28, kv_heads=4, head_dim=128, context_tokens=131072)
    >>> g.name, g.tensor_classes, g.nbytes == 4 * 28 * 4 * 128 * 131072, g.cpu_touched
    ('kv_cache', ('kv_cache',), True, False)
    >>> [name for name, _ in g.parts]
    ['keys (2 bytes per element)', 'values (2 bytes per element)']
    """
    n_layers = _positive_int(layers, "layers")
    heads = _positive_int(kv_heads, "kv_heads")
    dim = _positive_int(head_dim, "head_dim")
    tokens = _positive_int(context_tokens, "context_tokens")
    b = _positive_int(batch, "batch")
    elem = _positive_int(dtype_nbytes, "dtype_nbytes")
    half = elem * n_layers * heads * dim * tokens * b
    return TensorGroup(
        name="kv_cache",
        tensor_classes=("kv_cache",),
        nbytes=2 * half,
        cpu_touched=False,
        parts=(
            (f"keys ({elem} bytes per element)", half),
            (f"values ({elem} bytes per element)", half),
        ),
    )
