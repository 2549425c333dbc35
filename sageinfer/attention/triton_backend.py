"""Triton backend: fused norm/rotary/cache write, then one paged-attention launch for the batch."""
from __future__ import annotations

import torch

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata
from sageinfer.ops.paged_attention import choose_num_splits, paged_attention
from sageinfer.ops.rope_cache import rope_and_cache


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_sms: int = 132):
        self.num_sms = num_sms

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:
        if meta.max_query_len == 1:
            meta.num_splits = choose_num_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len, self.num_sms)

    def forward(self, layer, positions, q, k, v, cache, meta):
        q_norm = layer.q_norm.weight if layer.q_norm is not None else None
        k_norm = layer.k_norm.weight if layer.k_norm is not None else None
        eps = layer.q_norm.eps if layer.q_norm is not None else 0.0
        num_tokens = meta.num_actual_tokens
        q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
        rope_and_cache(positions[:num_tokens], q, k, v, layer.rotary_emb.cos_sin_cache, cache.k, cache.v,
                       meta.slot_mapping, q_norm, k_norm, eps, cache.k_scale, cache.v_scale, cache.mode,
                       cache.fp8_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                               meta.num_seqs, meta.max_query_len, layer.scale, meta.num_splits,
                               max_seq_len=meta.max_seq_len, k_scale=cache.k_scale, v_scale=cache.v_scale,
                               kv_mode=cache.mode, fp8_scale=cache.fp8_scale)
