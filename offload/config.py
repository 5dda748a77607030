"""OffloadConfig: the typed, validated settings of offload.enable(), read from keyword arguments,
a YAML file or OFFLOAD_* environment variables. It checks values; it must not allocate or touch
the model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from allocators.declared_topology import yaml_problem
from allocators.errors import ConfigError
from allocators.policies import POLICY_NAMES, TIER_NAMES
from allocators.units import parse_size
from offload.planning.activation_bytes import ACTIVATION_MODES


@dataclass(frozen=True)
class OffloadConfig:
    """Everything offload.enable() can be told; the defaults do the right thing for one GPU.

    - ``activations``: ``"saved_tensors"`` offloads every saved activation of at least
      ``activation_min_nbytes``; ``"checkpoint"`` (the paper's mode) keeps only each decoder
      layer's input, on the host, and recomputes the layer in backward; ``"off"``.
    - ``optimizer_offload``: fp32 master params and optimizer state live on the host and the CPU
      optimizer steps them; gradients leave the device in buckets of ``bucket_nbytes``.
    - ``grad_accumulation_steps``: backward passes per optimizer step. Knowing it lets finished
      buckets be stepped while backward still runs (``overlap_step``) without changing results.
    - ``max_grad_norm``: clip by global norm (as ``torch.nn.utils.clip_grad_norm_``); the norm needs
      every gradient, so buckets then step at ``optimizer.step()``.
    - ``policy`` and ``budgets`` (bytes per host tier) decide where host buffers go; the plan
      sizes activation checkpoints for micro-batches of ``plan_tokens`` tokens. ``"planned"``
      asks the planner for the placement with the shortest predicted step, using the rates of
      ``profile`` (an ``offload-profile`` JSON, read when planning) or the declared/paper rates.
    - ``overlap_step`` steps buckets early: hyper-parameters are read when a bucket finishes in
      backward, so set lr before backward (as LR schedulers do), or turn it off. If backward
      fails midway, buckets already stepped stay stepped (a ``PartialStepWarning`` says so when
      the step is dropped); turned off, every step is all-or-nothing.
    - ``loss_chunk_tokens``: a transformers causal LM called with ``labels`` computes its loss
      this many tokens at a time (offload.runtime.chunked_loss), so the [tokens, vocab] logits never
      exist whole; the output's ``logits`` is then None. For long sequences with big vocabularies.
    - ``dashboard``: draw a live panel of memory per tier, transfer rates, the step's phases and
      throughput from a background thread (one log line per step when stderr is not a terminal).

    >>> OffloadConfig.from_kwargs(budgets={"dram": "2GiB"}, activations="checkpoint").budgets
    {'dram': 2147483648}
    """

    activations: str = "saved_tensors"
    optimizer_offload: bool = True
    policy: str = "cxl_aware"
    budgets: dict[str, int] = field(default_factory=dict)
    activation_min_nbytes: int = 1 << 20
    prefetch_layers: int = 1
    bucket_nbytes: int = 32 << 20
    grad_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    overlap_step: bool = True
    optimizer_threads: int | None = None
    plan_tokens: int = 8192
    profile: str | None = None
    dashboard: bool = False
    loss_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_choice("activations", self.activations, ACTIVATION_MODES)
        _check_choice("policy", self.policy, POLICY_NAMES)
        _check_bool("optimizer_offload", self.optimizer_offload)
        _check_bool("overlap_step", self.overlap_step)
        _check_bool("dashboard", self.dashboard)
        if not isinstance(self.budgets, Mapping):
            raise ConfigError(
                f"budgets = {self.budgets!r} is not a mapping; write "
                "{'dram': '64GiB', 'cxl': '256GiB'}"
            )
        for key, value in self.budgets.items():
            _size(value, f"budget {key!r}")
            if key not in TIER_NAMES:
                raise ConfigError(
                    f"budgets has a tier {key!r}; tiers are {list(TIER_NAMES)}, "
                    "e.g. budgets={'dram': '64GiB', 'cxl': '256GiB'}"
                )
        _check_int("prefetch_layers", self.prefetch_layers, minimum=0)
        _check_int("grad_accumulation_steps", self.grad_accumulation_steps, minimum=1)
        _check_int("bucket_nbytes", self.bucket_nbytes, minimum=1)
        _check_int("activation_min_nbytes", self.activation_min_nbytes, minimum=0)
        _check_int("plan_tokens", self.plan_tokens, minimum=1)
        if self.profile is not None:
            if not isinstance(self.profile, str) or not self.profile:
                raise ConfigError(
                    f"profile = {self.profile!r} must be the path of an offload-profile JSON, "
                    "e.g. profile='profiles/machine.json', or None"
                )
            if self.policy != "planned":
                raise ConfigError(
                    f"profile is read only by policy='planned' (policy is {self.policy!r}); "
                    "set policy='planned' or drop profile"
                )
        if self.optimizer_threads is not None:
            _check_int("optimizer_threads", self.optimizer_threads, minimum=1)
        if self.loss_chunk_tokens is not None:
            _check_int("loss_chunk_tokens", self.loss_chunk_tokens, minimum=1)
        norm = self.max_grad_norm
        if norm is not None and (
            isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0
        ):
            raise ConfigError(
                f"max_grad_norm = {norm!r} must be a positive number, e.g. 1.0, or None for no "
                "clipping"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> OffloadConfig:
        """Build a config from keyword arguments, parsing sizes such as ``"32MiB"``.

        >>> OffloadConfig.from_kwargs(bucket_nbytes="8MiB").bucket_nbytes
        8388608
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"unknown offload setting(s) {unknown}; known settings are {sorted(known)}"
            )
        values = dict(kwargs)
        if "activations" in values:
            values["activations"] = _activation_mode(values["activations"])
        for name in ("bucket_nbytes", "activation_min_nbytes"):
            if name in values:
                values[name] = _size(values[name], name)
        if "budgets" in values:
            values["budgets"] = _parse_budgets(values["budgets"])
        if isinstance(values.get("profile"), Path):
            values["profile"] = str(values["profile"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OffloadConfig:
        """Read a YAML mapping of settings, e.g. ``activations: checkpoint`` on one line.

        >>> OffloadConfig.from_yaml("offload.yaml")  # doctest: +SKIP
        """
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"offload config {path}: cannot be read ({exc}); give the path of a UTF-8 YAML "
                "file such as offload.yaml"
            ) from None
        except Exception as exc:  # PyYAML raises more than YAMLError on odd tags ('!!int' alone)
            raise ConfigError(
                f"offload config {path} is not valid YAML{yaml_problem(exc)}; write one "
                "'setting: value' per line"
            ) from None
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{path} holds a {type(data).__name__}; write a mapping such as "
                "'activations: checkpoint' one setting per line"
            )
        odd = [key for key in data if not isinstance(key, str)]
        if odd:
            raise ConfigError(
                f"{path} has setting name(s) {odd!r} that are not text; write names such as "
                "'activations: checkpoint'"
            )
        return cls.from_kwargs(**data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Read OFFLOAD_* variables (``OFFLOAD_BUCKET_NBYTES=64MiB``) as settings to merge.

        Returns the parsed values, not a config, so they can override or be overridden.

        >>> OffloadConfig.from_env({"OFFLOAD_MAX_GRAD_NORM": "1.0", "OFFLOAD_BUDGET_DRAM": "1GiB"})
        {'budgets': {'dram': '1GiB'}, 'max_grad_norm': 1.0}
        """
        environ = os.environ if environ is None else environ
        by_name = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        budgets: dict[str, str] = {}
        for key in sorted(environ):
            if not key.startswith("OFFLOAD_"):
                continue
            name = key[len("OFFLOAD_") :].lower()
            raw = environ[key]
            if name.startswith("budget_"):
                budgets[name[len("budget_") :]] = raw
            elif name in by_name:
                values[name] = _from_env_text(name, raw)
            elif name not in _ENV_IGNORED:
                raise ConfigError(
                    f"environment variable {key} is not an offload setting; known: "
                    + ", ".join(f"OFFLOAD_{n.upper()}" for n in sorted(by_name))
                    + ", OFFLOAD_BUDGET_DRAM, OFFLOAD_BUDGET_CXL, OFFLOAD_CONFIG"
                )
        if budgets:
            values = {"budgets": budgets, **values}
        return values

    def replace(self, **changes: Any) -> OffloadConfig:
        """A copy with some settings changed, validated like the original.

        >>> OffloadConfig().replace(activations="off").activations
        'off'
        """
        return OffloadConfig.from_kwargs(**{**dataclasses.asdict(self), **changes})


# OFFLOAD_CONFIG names a YAML file (read by enable()); it is not a field of the config itself.
_ENV_IGNORED = ("config",)


def resolve_config(config: OffloadConfig | str | Path | None, **kwargs: Any) -> OffloadConfig:
    """Merge, lowest first: defaults, OFFLOAD_CONFIG file, OFFLOAD_* variables, ``config``, kwargs.

    >>> resolve_config(None, activations=False).activations
    'off'
    """
    merged: dict[str, Any] = {}
    env_file = os.environ.get("OFFLOAD_CONFIG")
    if env_file:
        merged.update(_explicit(OffloadConfig.from_yaml(env_file)))
    merged.update(OffloadConfig.from_env())
    if isinstance(config, OffloadConfig):
        merged.update(_explicit(config))
    elif isinstance(config, (str, Path)):
        merged.update(_explicit(OffloadConfig.from_yaml(config)))
    elif config is not None:
        raise ConfigError(
            f"config = {config!r} is neither an OffloadConfig nor a YAML path; pass "
            "OffloadConfig(...) or 'offload.yaml'"
        )
    merged.update(kwargs)
    return OffloadConfig.from_kwargs(**merged)


def _explicit(config: OffloadConfig) -> dict[str, Any]:
    """The settings of ``config`` that differ from the defaults (so lower layers still show)."""
    default = OffloadConfig()
    return {
        f.name: getattr(config, f.name)
        for f in fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }


def _activation_mode(value: Any) -> str:
    # True/False read naturally in enable(activations=True); they map onto the modes.
    if value is True:
        return "saved_tensors"
    if value is False or value is None:
        return "off"
    return value


def _parse_budgets(budgets: Any) -> dict[str, int]:
    if budgets is None:
        return {}
    if not isinstance(budgets, Mapping):
        raise ConfigError(
            f"budgets = {budgets!r} is not a mapping; write {{'dram': '64GiB', 'cxl': '256GiB'}}"
        )
    return {str(k): _size(v, f"budget {k!r}") for k, v in budgets.items()}


def _size(value: Any, what: str) -> int:
    try:
        return parse_size(value, what=what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _from_env_text(name: str, raw: str) -> Any:
    kind = {f.name: f.type for f in fields(OffloadConfig)}[name]
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"OFFLOAD_{name.upper()}={raw!r} is not a boolean; write 1 or 0")
        return lowered in ("1", "true", "yes")
    if kind in ("int", "int | None") and name not in ("bucket_nbytes", "activation_min_nbytes"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"OFFLOAD_{name.upper()}={raw!r} is not an integer") from None
    if kind == "float | None":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(
                f"OFFLOAD_{name.upper()}={raw!r} is not a number; write e.g. 1.0"
            ) from None
    return raw


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {list(choices)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} must be True or False")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} must be an integer >= {minimum}")
