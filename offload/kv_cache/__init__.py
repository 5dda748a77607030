"""The tiered KV cache for long-context decoding: `TieredKVCache` (cache.py) keeps each layer's
keys and values in placed host blocks (layer.py) and prefetches the next layer while one computes.
"""

__all__ = ["TieredKVCache"]


def __getattr__(name: str):
    # cache.py subclasses a transformers class; import it only when asked for.
    if name == "TieredKVCache":
        from offload.kv_cache.cache import TieredKVCache

        return TieredKVCache
    raise AttributeError(f"module 'offload.kv_cache' has no attribute {name!r}")
