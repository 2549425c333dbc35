"""Pages of an FP8 or INT8 KV cache copied out in 16-bit, for a prefill kernel that reads 16-bit pages only
(the platform's): one pass over the listed pages, each value times its scale (FP8: the cache's one scale;
INT8: its token and KV head's). In torch the gather, the conversion and the scaling were three passes
(H200, 256 pages of Qwen3-8B shapes: 122 us a layer for K and V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops.int8_values import values_as
from sageinfer.ops.rope_cache import scale_offsets, scales_head_major

BLOCK = 4096


@triton.jit
def _widen_pages_kernel(src_ptr, scale_ptr, dst_ptr, pages_ptr, fp8_scale, PAGE_SIZE: tl.constexpr,
                        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, INT8: tl.constexpr,
                        HEAD_MAJOR_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    packed = tl.program_id(0).to(tl.int64)
    page_elems: tl.constexpr = PAGE_SIZE * NUM_KV_HEADS * HEAD_DIM
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    page = tl.load(pages_ptr + packed)
    x = values_as(tl.load(src_ptr + page * page_elems + offs, mask=mask), tl.float32)
    if INT8:
        slot = offs // (NUM_KV_HEADS * HEAD_DIM)
        kv_head = (offs // HEAD_DIM) % NUM_KV_HEADS
        scale = tl.load(scale_ptr + scale_offsets(page, slot, kv_head, NUM_KV_HEADS, PAGE_SIZE, HEAD_MAJOR_SCALES),
                        mask=mask, other=0.0)
        # a scale no write has set (rows past a sequence's end) counts as 0: those rows, masked in the
        # attention, then hold no NaN to poison it (0 * NaN)
        scale = tl.where(tl.abs(scale) < float("inf"), scale, 0.0)
        y = x * scale
    else:
        y = x * fp8_scale
    tl.store(dst_ptr + packed * page_elems + offs, y.to(dst_ptr.dtype.element_ty), mask=mask)


def widen_pages(cache: torch.Tensor, pages: torch.Tensor, dtype: torch.dtype, fp8_scale: float = 1.0,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """cache [blocks, page, KV heads, dim] in FP8 e4m3 or INT8 (with scale [blocks, page, KV heads],
    token- or head-major), pages [P] int64: [P, page, KV heads, dim] in dtype, page i a copy of cache
    page pages[i] times its scales."""
    int8 = cache.dtype == torch.int8
    if int8 == (scale is None) or cache.dtype not in (torch.int8, torch.float8_e4m3fn) or not cache.is_contiguous():
        raise ValueError("widen_pages takes a contiguous FP8 cache, or an INT8 one with its scales")
    _, page_size, kv_heads, head_dim = cache.shape
    out = torch.empty((pages.numel(), page_size, kv_heads, head_dim), dtype=dtype, device=cache.device)
    if pages.numel():
        grid = (pages.numel(), triton.cdiv(page_size * kv_heads * head_dim, BLOCK))
        _widen_pages_kernel[grid](cache, scale if int8 else cache, out, pages, float(fp8_scale), PAGE_SIZE=page_size,
                                  NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, INT8=int8,
                                  HEAD_MAJOR_SCALES=scales_head_major(scale) if int8 else False, BLOCK=BLOCK,
                                  num_warps=4)
    return out
