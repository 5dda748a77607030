"""The exceptions the allocators raise, each meant to be read by a person who must act on it.

Messages name what was asked, what the machine has, and what to write instead; no logic here.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base of every error this project raises on purpose."""


class TopologyError(OffloadError, ValueError):
    """A sysfs tree or a declared topology file cannot be read as a machine description."""


class PlacementError(OffloadError, ValueError):
    """A placement names a node that does not exist, or fractions that do not add up."""


class BudgetExceededError(OffloadError, MemoryError):
    """An allocation would pass a tier's budget; raised before any memory is touched."""


class NumaError(OffloadError, OSError):
    """A NUMA system call failed for a reason other than a missing permission."""


class ConfigError(OffloadError, ValueError):
    """A user-supplied setting (a size, a budget, a policy or class name) is not valid."""


class KernelBuildError(OffloadError, RuntimeError):
    """A C/C++ kernel (the profilers' measurement kernels, the CPU optimizer's fused step) could
    not be compiled or loaded on this machine; each caller falls back to a slower path."""
