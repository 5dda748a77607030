"""offload: wrap a training loop so activations, optimizer state and KV cache live in host tiers.

Entry points are re-exported here; the machinery lives in the sibling modules.
"""

from offload.config import ConfigError, OffloadConfig
from offload.enable import enable
from offload.kv_cache import TieredKVCache
from offload.session import OffloadSession

__all__ = ["ConfigError", "OffloadConfig", "OffloadSession", "TieredKVCache", "enable"]
