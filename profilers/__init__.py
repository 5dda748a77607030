"""profilers: measure every memory tier of this machine (DMA, latency, bandwidth, optimizer speed)
and write the profile file the planner reads.
"""

from profilers.machine_profile import (
    SCHEMA,
    MachineProfile,
    NodeProfile,
    ProfileError,
    load_profile,
)

__all__ = ["SCHEMA", "MachineProfile", "NodeProfile", "ProfileError", "load_profile"]
