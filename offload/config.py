"""OffloadConfig: the typed, validated settings of offload.enable(), read from keyword arguments,
a YAML file or OFFLOAD_* environment variables, and the one order in which those win
(resolve_config). It checks values; it must not allocate or touch the model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from allocators.errors import ConfigError
from allocators.policies import POLICY_NAMES, TIER_NAMES, parse_budget_args
from allocators.units import parse_size
from allocators.yaml_text import load_yaml, yaml_problem
from offload.planning.activation_bytes import ACTIVATION_MODES
from optim_cpu.contention import ContentionPolicy

# Host-step threads beyond this only contend for cores (no machine here has more to give them);
# 10,000 threads would be started and each would slow the step.
MAX_OPTIMIZER_THREADS = 1024
CONTENTION_MODES = ("auto", "off")


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
    - ``contention``: how the CPU optimizer yields memory bandwidth while copies move data:
      ``"auto"`` (on only where the machine profile measured real DMA slowed by the step; see
      offload.planning.contention_choice), ``"off"``, or the knobs as a ``ContentionPolicy``,
      a mapping (``{"threads_during_dma": 2, "duty_cycle_during_dma": 0.5}``) or, from text,
      ``"threads_during_dma=2,duty_cycle_during_dma=0.5"``.
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
    contention: str | ContentionPolicy = "auto"

    def __post_init__(self) -> None:
        # Frozen: the one normal form (a mode or a ContentionPolicy) is set here, once.
        object.__setattr__(self, "contention", _contention(self.contention))
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
            if self.optimizer_threads > MAX_OPTIMIZER_THREADS:
                raise ConfigError(
                    f"optimizer_threads = {self.optimizer_threads} is more than "
                    f"{MAX_OPTIMIZER_THREADS}; threads beyond the cores only slow the host step "
                    f"(this machine has {os.cpu_count()} CPUs): write at most that, or None"
                )
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
        return cls.from_kwargs(**read_yaml_settings(path))

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
        budgets: dict[str, Any] = {}
        for key in sorted(environ):
            if not key.startswith("OFFLOAD_"):
                continue
            name = key[len("OFFLOAD_") :].lower()
            raw = environ[key]
            if name == "budgets":
                # Syntax only: OFFLOAD_BUDGETS=dram=64GiB,cxl=256GiB, as --budget reads it.
                values["budgets"] = parse_budget_args([raw], what=key)
            elif name.startswith("budget_"):
                budgets[name[len("budget_") :]] = raw
            elif name in by_name:
                values[name] = _from_env_text(name, raw)
            elif name not in _ENV_IGNORED:
                raise ConfigError(
                    f"environment variable {key} is not an offload setting; known: "
                    + ", ".join(f"OFFLOAD_{n.upper()}" for n in sorted(by_name))
                    + ", OFFLOAD_BUDGET_DRAM, OFFLOAD_BUDGET_CXL, OFFLOAD_BUDGET_REMOTE_DRAM, "
                    "OFFLOAD_CONFIG"
                )
        if budgets and "budgets" in values:
            raise ConfigError(
                "OFFLOAD_BUDGETS and OFFLOAD_BUDGET_<TIER> are both set; give the budgets one "
                "way, e.g. OFFLOAD_BUDGETS=dram=64GiB,cxl=256GiB"
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


def resolve_config(
    config: OffloadConfig | str | Path | None = None,
    given: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> OffloadConfig:
    """The settings enable() runs with. For each setting the first of these that gives it wins:

    1. ``given``: the keyword arguments passed to enable(), each one that was passed (a value
       equal to the default, passed explicitly, still wins);
    2. ``config``: an OffloadConfig (taken whole: every setting in it counts as given) or a
       YAML file; when ``config`` is None, the YAML file that ``OFFLOAD_CONFIG`` names;
    3. ``OFFLOAD_*`` variables (``OFFLOAD_POLICY=planned``, ``OFFLOAD_BUDGETS=dram=64GiB,cxl=256GiB``);
    4. the defaults of OffloadConfig.

    ``budgets`` is one setting: a layer that gives it replaces the lower layers' budgets whole.

    ``environ`` stands for ``os.environ`` (tests).

    >>> resolve_config(None, {"activations": False}).activations
    'off'
    >>> resolve_config(None, {"policy": "cxl_aware"}, environ={"OFFLOAD_POLICY": "planned"}).policy
    'cxl_aware'
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = OffloadConfig.from_env(environ)
    if isinstance(config, OffloadConfig):
        merged.update(dataclasses.asdict(config))
    else:
        path = config if config is not None else environ.get("OFFLOAD_CONFIG") or None
        if isinstance(path, (str, Path)):
            merged.update(read_yaml_settings(path))
        elif path is not None:
            raise ConfigError(
                f"config = {config!r} is neither an OffloadConfig nor a YAML path; pass "
                "OffloadConfig(...) or 'offload.yaml'"
            )
    merged.update(given or {})
    return OffloadConfig.from_kwargs(**merged)


def read_yaml_settings(path: str | Path) -> dict[str, Any]:
    """The settings a YAML file gives, as written (only those it names), refusing a file that
    cannot be read, is not YAML, is not a mapping of names, or names one setting twice.

    >>> read_yaml_settings("offload.yaml")  # doctest: +SKIP
    {'activations': 'checkpoint'}
    """
    try:
        data = load_yaml(Path(path).read_text()) or {}
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
    return dict(data)


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


def _contention(value: Any) -> str | ContentionPolicy:
    """The ``contention`` setting in its normal form: "auto", "off" or a ContentionPolicy.

    >>> _contention("threads_during_dma=2")
    ContentionPolicy(threads_during_dma=2, duty_cycle_during_dma=1.0)
    >>> _contention(False)  # YAML reads `contention: off` as false
    'off'
    """
    hint = (
        "write 'auto', 'off', or the knobs: {'threads_during_dma': 2, "
        "'duty_cycle_during_dma': 0.5} (as text 'threads_during_dma=2,duty_cycle_during_dma=0.5')"
    )
    if isinstance(value, ContentionPolicy) or value in CONTENTION_MODES:
        return value
    if value is False:
        return "off"
    if isinstance(value, str) and "=" in value:
        value = _contention_knobs_from_text(value, hint)
    if not isinstance(value, Mapping):
        raise ConfigError(f"contention = {value!r} is not a contention setting; {hint}")
    knobs = {f.name for f in fields(ContentionPolicy)}
    unknown = sorted(str(key) for key in value if key not in knobs)
    if unknown:
        raise ConfigError(f"contention has unknown knob(s) {unknown}; {hint}")
    try:
        return ContentionPolicy(**value)
    except ValueError as exc:
        raise ConfigError(f"contention: {exc}") from None


def _contention_knobs_from_text(text: str, hint: str) -> dict[str, Any]:
    knobs: dict[str, Any] = {}
    for part in text.split(","):
        key, _, raw = part.partition("=")
        key, raw = key.strip(), raw.strip()
        if key == "threads_during_dma":
            knobs[key] = None if raw.lower() == "none" else _number(raw, int, text, hint)
        elif key == "duty_cycle_during_dma":
            knobs[key] = _number(raw, float, text, hint)
        else:
            raise ConfigError(f"contention = {text!r} has unknown knob {key!r}; {hint}")
    return knobs


def _number(raw: str, kind: type, text: str, hint: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"contention = {text!r}: {raw!r} is not a number; {hint}") from None


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {list(choices)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r} must be True or False")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} = {value!r} must be an integer >= {minimum}")
