"""Plain-torch paged attention: runs on every platform, the oracle for the Triton backend."""
from __future__ import annotations

import torch

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata, LayerKVCache
from sageinfer.layers.norm import rms_norm_ref

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_kv_ref(x: torch.Tensor, cache: LayerKVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [tokens, heads, dim] -> (values in the cache dtype, int8 scales [tokens, heads] or None)."""
    if cache.dtype == "int8":
        scale = x.float().abs().amax(dim=-1).clamp_min(1e-8) / 127.0
        return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale
    if cache.dtype == "fp8":
        return (x.float() / cache.fp8_scale).clamp(-FP8_MAX, FP8_MAX).to(cache.k.dtype), None
    return x.to(cache.k.dtype), None


def dequantize_kv_ref(values: torch.Tensor, scale: torch.Tensor | None, cache: LayerKVCache) -> torch.Tensor:
    """Cache values (any leading shape, last two dims heads x dim) back to float32."""
    if cache.dtype == "int8":
        return values.float() * scale[..., None]
    if cache.dtype == "fp8":
        return values.float() * cache.fp8_scale
    return values.float()


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache, slot_mapping: torch.Tensor) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = cache.k.shape[2], cache.k.shape[3]
    for values, store, scales in ((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale)):
        quantized, scale = quantize_kv_ref(values[valid], cache)
        store.view(-1, num_kv_heads, head_dim)[slots] = quantized
        if scale is not None:  # indexed by page and slot: the scales may be stored head-major
            page = cache.k.shape[1]
            scales[slots // page, slots % page] = scale


def _gather_context(store: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, seq_len: int,
                    cache: LayerKVCache) -> torch.Tensor:
    """One sequence's first seq_len cached vectors, dequantised: [seq_len, kv_heads, head_dim] fp32."""
    num_kv_heads, head_dim = store.shape[2], store.shape[3]
    values = store[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
    sc = scales[blocks].reshape(-1, num_kv_heads)[:seq_len] if scales is not None else None
    return dequantize_kv_ref(values, sc, cache)


def paged_attention_ref(q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    num_heads = q.shape[1]
    block_size, num_kv_heads = cache.k.shape[1], cache.k.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        query_len = end - start
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = meta.block_table[i, :num_blocks].long()
        keys = _gather_context(cache.k, cache.k_scale, blocks, seq_len, cache).repeat_interleave(group, dim=1)
        values = _gather_context(cache.v, cache.v_scale, blocks, seq_len, cache).repeat_interleave(group, dim=1)
        queries = q[start:end].float()                    # [Q, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"
    graph_capturable = False  # loops on the host over each sequence's lengths

    def forward(self, layer, positions, q, k, v, cache, meta):
        if layer.q_norm is not None:
            q = rms_norm_ref(q, layer.q_norm.weight, layer.q_norm.eps)
            k = rms_norm_ref(k, layer.k_norm.weight, layer.k_norm.eps)
        q, k = layer.rotary_emb(positions, q, k)
        write_kv_cache_ref(k, v, cache, meta.slot_mapping)
        return paged_attention_ref(q, cache, meta, layer.scale)
