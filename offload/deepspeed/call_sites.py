"""Where upstream DeepSpeed 0.19.x pins its ZeRO offload host buffers, and the tensor class each one
is. It names call sites and checks the version only; it must not allocate or patch anything.
"""

from __future__ import annotations

import linecache
import os
from dataclasses import dataclass
from types import FrameType

from allocators.errors import ConfigError
from allocators.tensor_classes import TensorClass

SUPPORTED_SERIES = "0.19"


@dataclass(frozen=True)
class CallSite:
    """A ``get_accelerator().pin_memory(...)`` call in DeepSpeed: file, function, a name on its line.

    >>> CallSite("stage3.py", "_setup_for_real_optimizer", "grad_partitions_flat_buffer",
    ...          "master_grads").tensor_class
    'master_grads'
    """

    file: str
    function: str
    token: str
    tensor_class: TensorClass


# Read from deepspeed 0.19.8 runtime/zero. All but one run inside deepspeed.initialize; ZeRO-2
# offload makes its per-parameter CPU gradient accumulation buffers (gradient_accumulation_steps
# > 1) in the first backward, through the engine call the placement routes once attached.
CALL_SITES: tuple[CallSite, ...] = (
    CallSite("stage_1_and_2.py", "__init__", "weights_partition", "master_params"),
    CallSite("stage_1_and_2.py", "__init__", "temp_buffer_bit16", "params"),
    CallSite("stage_1_and_2.py", "__init__", "temp_grad_buffer_for_cpu_offload", "grads"),
    CallSite(
        "stage_1_and_2.py", "initialize_optimizer_states", "single_grad_partition", "master_grads"
    ),
    CallSite("stage_1_and_2.py", "buffer_to_accumulate_to_in_cpu", "pin_memory(buffer)", "grads"),
    CallSite(
        "stage3.py", "_setup_for_real_optimizer", "grad_partitions_flat_buffer", "master_grads"
    ),
    CallSite(
        "stage3.py",
        "_create_param_groups_fp16_flat_cpu_memory",
        "param_groups_fp16_flat_cpu_memory",
        "params",
    ),
    CallSite(
        "stage3.py", "initialize_optimizer_states", "subgroup_gradient_buffer", "master_grads"
    ),
    CallSite("partition_parameters.py", "_partition_param", "partitioned_tensor", "params"),
    CallSite(
        "partition_parameters.py", "_partition_param_sec", "secondary_partitioned_tensor", "params"
    ),
)
_FILES = {site.file for site in CALL_SITES}


def check_version(version: str) -> None:
    """Raise ConfigError unless ``version`` is a DeepSpeed release this plugin was written against.

    >>> check_version("0.19.8")
    >>> check_version("0.20.0")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    allocators.errors.ConfigError: deepspeed 0.20.0 is not supported: ...
    """
    if version.split("+")[0].split(".")[:2] != SUPPORTED_SERIES.split("."):
        raise ConfigError(
            f"deepspeed {version} is not supported: offload.deepspeed hooks the ZeRO offload "
            f"buffers of deepspeed {SUPPORTED_SERIES}.x only (where they are made changes between "
            f"releases); install deepspeed=={SUPPORTED_SERIES}.8 (pip install "
            "'tiered-offload[deepspeed]') or run without offload.deepspeed"
        )


def _in_deepspeed_zero(filename: str) -> bool:
    parts = filename.replace(os.sep, "/").split("/")
    return len(parts) >= 3 and parts[-3:-1] == ["runtime", "zero"] and parts[-1] in _FILES


def classify(frame: FrameType | None) -> CallSite | None:
    """The call site that pinned from ``frame`` or one of its callers, or None for an unknown one.

    The first caller inside deepspeed/runtime/zero decides: its function and the names on the
    calling line (and the line either side, as a call may span lines) must match one site.

    >>> import sys
    >>> classify(sys._getframe()) is None
    True
    """
    while frame is not None and not _in_deepspeed_zero(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return None
    filename = frame.f_code.co_filename
    text = " ".join(
        linecache.getline(filename, n) for n in range(frame.f_lineno - 1, frame.f_lineno + 2)
    )
    base = os.path.basename(filename)
    matches = [
        site
        for site in CALL_SITES
        if site.file == base and site.function == frame.f_code.co_name and site.token in text
    ]
    return matches[0] if len(matches) == 1 else None
