"""profilers: measure every memory tier of this machine (DMA, latency, bandwidth, optimizer speed)
and write the profile file the planner reads.
"""
