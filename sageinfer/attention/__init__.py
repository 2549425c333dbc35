from sageinfer.attention.backend import AttentionBackend, AttentionMetadata, LayerKVCache, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "LayerKVCache", "get_attention_backend"]
