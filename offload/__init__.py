"""offload: wrap a training loop so activations, optimizer state and KV cache live in host tiers.

Entry points are re-exported here; the machinery lives in the sibling modules.
"""

from offload.config import ConfigError, OffloadConfig
from offload.enable import enable
from offload.session import OffloadSession

__all__ = ["ConfigError", "OffloadConfig", "OffloadSession", "TieredKVCache", "enable"]


def __getattr__(name: str):
    # TieredKVCache subclasses a transformers class: importing transformers costs over a second,
    # which training-only users and the CLI should not pay at `import offload`.
    if name == "TieredKVCache":
        from offload.kv_cache.cache import TieredKVCache

        return TieredKVCache
    raise AttributeError(f"module 'offload' has no attribute {name!r}")
