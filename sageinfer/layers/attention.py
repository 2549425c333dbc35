"""The model's attention layer: owns rotary and the optional q/k norm, and hands q/k/v to the
backend, which decides how to apply them (the Triton backend fuses them with the cache write)."""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata, LayerKVCache
from sageinfer.layers.norm import RMSNorm
from sageinfer.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary_emb: RotaryEmbedding,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rotary_emb = rotary_emb
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: LayerKVCache, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] before rotary; returns [T, Hq, D]."""
        return backend.forward(self, positions, q, k, v, kv_cache, meta)
