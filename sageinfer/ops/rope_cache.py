"""Rotary embedding fused with the KV-cache write (and Qwen3's per-head q/k RMSNorm before it).

One program per token: q is rotated in place; k is normalised, rotated and written straight into
its cache slot together with v, so k never makes a round trip through memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_halves(x1, x2, weight_ptr, d, dmask, eps, dtype, HEAD_DIM: tl.constexpr):
    """Per-head RMSNorm of a head split in its two rotary halves (fp32 in, fp32 out, rounded as
    transformers rounds: normalise, cast to the model dtype, scale)."""
    half = HEAD_DIM // 2
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(weight_ptr + d, mask=dmask, other=0.0)[None, :]
    w2 = tl.load(weight_ptr + half + d, mask=dmask, other=0.0)[None, :]
    return ((x1 * rstd).to(dtype) * w1).to(tl.float32), ((x2 * rstd).to(dtype) * w2).to(tl.float32)


@triton.jit
def _rope_cache_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_norm_ptr, k_norm_ptr, eps,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cs, stride_c_slot, stride_c_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, QK_NORM: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    half = HEAD_DIM // 2
    pos = tl.load(positions_ptr + tok)
    d = tl.arange(0, HALF_PAD)
    dmask = d < half
    cos = tl.load(cos_sin_ptr + pos * stride_cs + d, mask=dmask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + half + d, mask=dmask, other=0.0)[None, :]

    # q: [heads, half] x 2
    h = tl.arange(0, HEADS_PAD)
    qmask = (h < NUM_HEADS)[:, None] & dmask[None, :]
    q_base = q_ptr + tok * stride_q_tok + h[:, None] * stride_q_head + d[None, :]
    q1 = tl.load(q_base, mask=qmask, other=0.0)
    q2 = tl.load(q_base + half, mask=qmask, other=0.0)
    dtype = q1.dtype
    q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    if QK_NORM:
        q1, q2 = _rms_norm_halves(q1, q2, q_norm_ptr, d, dmask, eps, dtype, HEAD_DIM)
    tl.store(q_base, (q1 * cos - q2 * sin).to(dtype), mask=qmask)
    tl.store(q_base + half, (q2 * cos + q1 * sin).to(dtype), mask=qmask)

    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:
        return
    kh = tl.arange(0, KV_HEADS_PAD)
    kmask = (kh < NUM_KV_HEADS)[:, None] & dmask[None, :]
    k_base = k_ptr + tok * stride_k_tok + kh[:, None] * stride_k_head + d[None, :]
    k1 = tl.load(k_base, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k_base + half, mask=kmask, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = _rms_norm_halves(k1, k2, k_norm_ptr, d, dmask, eps, dtype, HEAD_DIM)
    c_base = slot * stride_c_slot + kh[:, None] * stride_c_head + d[None, :]
    cache_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + c_base, (k1 * cos - k2 * sin).to(cache_ty), mask=kmask)
    tl.store(k_cache_ptr + c_base + half, (k2 * cos + k1 * sin).to(cache_ty), mask=kmask)
    v_base = v_ptr + tok * stride_v_tok + kh[:, None] * stride_v_head + d[None, :]
    tl.store(v_cache_ptr + c_base, tl.load(v_base, mask=kmask, other=0.0).to(cache_ty), mask=kmask)
    tl.store(v_cache_ptr + c_base + half, tl.load(v_base + half, mask=kmask, other=0.0).to(cache_ty), mask=kmask)


def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                   k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """q: [T, Hq, D] (rotated in place and returned), k/v: [T, Hkv, D] -> cache slots."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride() == v_cache.stride()
    qk_norm = q_norm_weight is not None
    _rope_cache_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight if qk_norm else q, k_norm_weight if qk_norm else q, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), QK_NORM=qk_norm)
    return q
