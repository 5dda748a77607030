"""Where users train: Hugging Face Trainer (and TRL's trainers) and accelerate, each one line.
Imports stay lazy so ``import offload`` never pulls in transformers or accelerate.

>>> from offload import integrations
>>> sorted(integrations.__all__)
['OffloadCallback', 'enable_with_accelerator', 'offload_trainer']
"""

from __future__ import annotations

import importlib

_WHERE = {
    "OffloadCallback": "offload.integrations.trainer_callback",
    "offload_trainer": "offload.integrations.trainer_callback",
    "enable_with_accelerator": "offload.integrations.accelerator",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'offload.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
