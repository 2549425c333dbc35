"""The model's attention layer: projections live in the model; this hands q/k/v to the backend."""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        return backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
