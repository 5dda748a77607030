"""offload: wrap a training loop so activations, optimizer state and KV cache live in host tiers.

Entry points are re-exported here; the machinery lives in the sibling modules.
"""
