"""Rotary embedding fused with the KV-cache write (and Qwen3's per-head q/k RMSNorm before it).

One program per token: q is rotated in place; k is normalised, rotated and written straight into
its cache slot together with v, so k never makes a round trip through memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch


@triton.jit
def rms_norm_halves(x1, x2, weight_ptr, d, dmask, eps, dtype, HEAD_DIM: tl.constexpr):
    """Per-head RMSNorm of a head split in its two rotary halves (fp32 in, fp32 out, rounded as
    transformers rounds: normalise, cast to the model dtype, scale)."""
    half = HEAD_DIM // 2
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
    w1 = tl.load(weight_ptr + d, mask=dmask, other=0.0)[None, :]
    w2 = tl.load(weight_ptr + half + d, mask=dmask, other=0.0)[None, :]
    return ((x1 * rstd).to(dtype) * w1).to(tl.float32), ((x2 * rstd).to(dtype) * w2).to(tl.float32)


@triton.jit
def scale_offsets(page, slot, kv_head, NUM_KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """Where an INT8 cache keeps the scale of a key (page, slot in it) of one KV head: [blocks, page, KV
    heads] (token-major), or [blocks, KV heads, page] (head-major: a page's scales of one head are
    contiguous, as a key tile of one head reads them)."""
    if HEAD_MAJOR:
        return (page * NUM_KV_HEADS + kv_head) * PAGE_SIZE + slot
    return (page * PAGE_SIZE + slot) * NUM_KV_HEADS + kv_head


def scales_head_major(scale: torch.Tensor | None) -> bool:
    """Whether an INT8 cache's scales (indexed [blocks, page, KV heads]) are stored head-major, a
    transposed view of [blocks, KV heads, page], rather than token-major; other layouts are refused."""
    if scale is None:
        return False
    _, page, heads = scale.shape
    if scale.stride() == (page * heads, heads, 1):
        return False
    if scale.stride() == (page * heads, 1, page):
        return True
    raise ValueError(f"INT8 KV scales must be [blocks, page, KV heads] token-major or a transposed view of "
                     f"[blocks, KV heads, page]; got strides {scale.stride()} for shape {tuple(scale.shape)}")


@triton.jit
def store_kv(cache_ptr, scale_ptr, c_base, half, scale_offs, mask, head_mask, x1, x2, fp8_inv_scale,
              KV_MODE: tl.constexpr):
    """Write one token's heads (two fp32 halves) in the cache dtype: 0 as is, 1 fp8 with a
    per-tensor scale, 2 int8 with a scale per head (absmax / 127, rounded half away from zero)."""
    cache_ty = cache_ptr.dtype.element_ty
    if KV_MODE == 2:
        scale = tl.maximum(tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1)), 1e-8) / 127.0
        y1, y2 = x1 / scale[:, None], x2 / scale[:, None]
        tl.store(cache_ptr + c_base, tl.where(y1 >= 0, y1 + 0.5, y1 - 0.5).to(tl.int8), mask=mask)
        tl.store(cache_ptr + c_base + half, tl.where(y2 >= 0, y2 + 0.5, y2 - 0.5).to(tl.int8), mask=mask)
        tl.store(scale_ptr + scale_offs, scale, mask=head_mask)
    elif KV_MODE == 1:
        y1 = tl.minimum(tl.maximum(x1 * fp8_inv_scale, -448.0), 448.0)
        y2 = tl.minimum(tl.maximum(x2 * fp8_inv_scale, -448.0), 448.0)
        tl.store(cache_ptr + c_base, y1.to(cache_ty), mask=mask)
        tl.store(cache_ptr + c_base + half, y2.to(cache_ty), mask=mask)
    else:
        tl.store(cache_ptr + c_base, x1.to(cache_ty), mask=mask)
        tl.store(cache_ptr + c_base + half, x2.to(cache_ty), mask=mask)


@triton.jit
def _rope_cache_kernel(
    positions_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_norm_ptr, k_norm_ptr, eps, k_scale_ptr, v_scale_ptr, fp8_inv_scale,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cs, stride_c_slot, stride_c_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, QK_NORM: tl.constexpr, KV_MODE: tl.constexpr,
    USE_PDL: tl.constexpr, PAGE_SIZE: tl.constexpr = 1, HEAD_MAJOR_SCALES: tl.constexpr = False,
):
    launch.wait_for_previous_kernel(USE_PDL)
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
        q1, q2 = rms_norm_halves(q1, q2, q_norm_ptr, d, dmask, eps, dtype, HEAD_DIM)
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
        k1, k2 = rms_norm_halves(k1, k2, k_norm_ptr, d, dmask, eps, dtype, HEAD_DIM)
    c_base = slot * stride_c_slot + kh[:, None] * stride_c_head + d[None, :]
    v_base = v_ptr + tok * stride_v_tok + kh[:, None] * stride_v_head + d[None, :]
    r1, r2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    v1 = tl.load(v_base, mask=kmask, other=0.0).to(tl.float32)
    v2 = tl.load(v_base + half, mask=kmask, other=0.0).to(tl.float32)
    scale_offs = scale_offsets(slot // PAGE_SIZE, slot % PAGE_SIZE, kh, NUM_KV_HEADS, PAGE_SIZE, HEAD_MAJOR_SCALES)
    store_kv(k_cache_ptr, k_scale_ptr, c_base, half, scale_offs, kmask, kh < NUM_KV_HEADS, r1, r2, fp8_inv_scale,
              KV_MODE)
    store_kv(v_cache_ptr, v_scale_ptr, c_base, half, scale_offs, kmask, kh < NUM_KV_HEADS, v1, v2, fp8_inv_scale,
              KV_MODE)


def rope_and_cache(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                   k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                   kv_mode: int = 0, fp8_scale: float = 1.0) -> torch.Tensor:
    """q: [T, Hq, D] (rotated in place and returned), k/v: [T, Hkv, D] -> cache slots, quantised per
    kv_mode (0 model dtype, 1 fp8 with fp8_scale, 2 int8 with per-token-head scales into k/v_scale)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride() == v_cache.stride()
    qk_norm = q_norm_weight is not None
    _rope_cache_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight if qk_norm else q, k_norm_weight if qk_norm else q, eps,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q, 1.0 / fp8_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), QK_NORM=qk_norm, KV_MODE=kv_mode,
        PAGE_SIZE=k_cache.shape[1], HEAD_MAJOR_SCALES=scales_head_major(k_scale) if kv_mode == 2 else False,
        **launch.dependent_launch_kwargs())
    return q
