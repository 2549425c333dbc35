"""Prefill attention over a paged cache whose pages hold whole key tiles.

When a cache page holds a whole number of key tiles, each tile is one contiguous run of cache rows:
one block-table read per tile instead of one per key, loads without per-key masks, and on chips with
a tensor copy engine (USE_TMA) the tile moves as one bulk copy. An FP8 cache (e4m3 values times one
scale) is read as stored, half the bytes, and widened in registers: the scale folds into the
softmax's for K and into the output for V. An INT8 cache (a scale per token and KV head) likewise:
each key's scale multiplies its scores, each value's its probabilities. Rows are packed as in
ops.paged_attention (BLOCK_Q query tokens x GROUP heads of one KV head) and the causal band is walked
in two loops: tiles wholly visible to every row of the program, then the masked tail.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
try:  # host-side tensor descriptors (Triton 3.3 on); a vendor's older Triton has none: no bulk copies there
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from sageinfer.ops import launch
from sageinfer.ops.int8_values import values_as
from sageinfer.ops.paged_attention import LOG2E, LONG_CONTEXT, fp8_query_factor, query_for_cache
from sageinfer.ops.rope_cache import scale_offsets, scales_head_major


@triton.jit
def _load_tile(cache, row, col, stride_row, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    if USE_TMA:
        tile = cache.load([row, col])
    else:
        offs = (row + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None] * stride_row + col + tl.arange(0, HEAD_DIM)[None, :]
        tile = tl.load(cache + offs)
    return tile


@triton.jit
def _tile_row(block_table_ptr, tile, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    key0 = tile * BLOCK_N
    return tl.load(block_table_ptr + key0 // PAGE_SIZE) * PAGE_SIZE + key0 % PAGE_SIZE


@triton.jit
def _token_scales(scale_ptr, row, kv_head, valid, NUM_KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAGE_SIZE: tl.constexpr, HEAD_MAJOR: tl.constexpr):
    """An INT8 cache's scales of the tile's keys (cache rows from row, within one page); 0 past the
    sequence's end (rows never written: their scale may be anything)."""
    rows = (row + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs = scale_offsets(rows // PAGE_SIZE, rows % PAGE_SIZE, kv_head, NUM_KV_HEADS, PAGE_SIZE, HEAD_MAJOR)
    return tl.where(valid, tl.load(scale_ptr + offs), 0.0)


@triton.jit
def _scores(q, k_cache, k_scale_ptr, row, col, kv_head, valid, stride_row, NUM_KV_HEADS: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, INT8: tl.constexpr,
            PAGE_SIZE: tl.constexpr, HEAD_MAJOR_SCALES: tl.constexpr):
    k = _load_tile(k_cache, row, col, stride_row, BLOCK_N, HEAD_DIM, USE_TMA)
    s = tl.dot(q, values_as(k, q.dtype).T)  # (a no-op but for a quantized cache: int8 and e4m3 are exact)
    if INT8:
        s = s * _token_scales(k_scale_ptr, row, kv_head, valid, NUM_KV_HEADS, BLOCK_N, PAGE_SIZE,
                              HEAD_MAJOR_SCALES)[None, :]
    return s


@triton.jit
def _update(s, m_i, l_i, acc, v_cache, v_scale_ptr, row, col, kv_head, tile, q_pos, kv_end, scale_log2, stride_row,
            dtype, NUM_KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
            USE_TMA: tl.constexpr, INT8: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_MAJOR_SCALES: tl.constexpr):
    if MASKED:
        k_idx = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows past the sequence's end in its last page were never written: their scores and values
        # are masked out (0 * NaN would still poison the sum).
        s = tl.where(k_idx[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.math.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = values_as(_load_tile(v_cache, row, col, stride_row, BLOCK_N, HEAD_DIM, USE_TMA), dtype)
    if MASKED:
        v = tl.where((tile * BLOCK_N + tl.arange(0, BLOCK_N) < kv_end)[:, None], v, 0.0)
    pv = p
    if INT8:
        valid = tile * BLOCK_N + tl.arange(0, BLOCK_N) < kv_end
        pv = p * _token_scales(v_scale_ptr, row, kv_head, valid, NUM_KV_HEADS, BLOCK_N, PAGE_SIZE,
                               HEAD_MAJOR_SCALES)[None, :]
    acc = tl.dot(pv.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


# A mixed step's prefill part reads its metadata from slices that start at any sequence: pointers that
# are not specialised on alignment (scalar loads gain nothing from it) compile once, not per offset.
@triton.jit(do_not_specialize=["stride_bt", "block_table_ptr", "seq_lens_ptr", "query_start_loc_ptr"])
def _prefill_attention_kernel(
    q_ptr, k_cache, v_cache, out_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2, v_scale,
    fp8_query_scale, k_scale_ptr, v_scale_ptr, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_row,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, USE_PDL: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr = 1, INT8: tl.constexpr = False, FP8: tl.constexpr = False,
    HEAD_MAJOR_SCALES: tl.constexpr = False,
):
    launch.wait_for_previous_kernel(USE_PDL)
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # Mixed steps launch as many query tiles per sequence as the longest chunk needs: the decodes'
    # spare programs leave at once (running them empty cost a 1,024-token chunk beside 64 decodes
    # 318 us instead of 194).
    if q_tile * BLOCK_Q >= query_len:
        return
    context_len = tl.load(seq_lens_ptr + seq) - query_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = q_idx < query_len
    dims = tl.arange(0, HEAD_DIM)
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    q = query_for_cache(q, fp8_query_scale, FP8)
    q_pos = context_len + q_idx

    kv_end = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, query_len)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    num_full = (context_len + q_tile * BLOCK_Q + 1) // BLOCK_N
    table = block_table_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    col = kv_head * HEAD_DIM
    for tile in range(0, num_full):
        row = _tile_row(table, tile, PAGE_SIZE, BLOCK_N)
        s = _scores(q, k_cache, k_scale_ptr, row, col, kv_head, True, stride_row, NUM_KV_HEADS, BLOCK_N, HEAD_DIM,
                    USE_TMA, INT8, PAGE_SIZE, HEAD_MAJOR_SCALES)
        m_i, l_i, acc = _update(s, m_i, l_i, acc, v_cache, v_scale_ptr, row, col, kv_head, tile, q_pos, kv_end,
                                scale_log2, stride_row, q.dtype, NUM_KV_HEADS, BLOCK_N, HEAD_DIM, False, USE_TMA, INT8,
                                PAGE_SIZE, HEAD_MAJOR_SCALES)
    for tile in range(num_full, num_tiles):
        row = _tile_row(table, tile, PAGE_SIZE, BLOCK_N)
        valid = tile * BLOCK_N + tl.arange(0, BLOCK_N) < kv_end
        s = _scores(q, k_cache, k_scale_ptr, row, col, kv_head, valid, stride_row, NUM_KV_HEADS, BLOCK_N, HEAD_DIM,
                    USE_TMA, INT8, PAGE_SIZE, HEAD_MAJOR_SCALES)
        m_i, l_i, acc = _update(s, m_i, l_i, acc, v_cache, v_scale_ptr, row, col, kv_head, tile, q_pos, kv_end,
                                scale_log2, stride_row, q.dtype, NUM_KV_HEADS, BLOCK_N, HEAD_DIM, True, USE_TMA, INT8,
                                PAGE_SIZE, HEAD_MAJOR_SCALES)
    out = acc * (v_scale / l_i)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# Launch configurations from benchmarks/experiments/probe_prefill_attention.py on an H100 (bf16, head dim 128,
# GQA 4), in TFLOP/s for the two 16K chunks of a 32K prompt / 16 prompts of 1024:
#   128x128 tiles, 8 warps, 2 stages: 473 / 486 / 263 (pages of 128 keys or more)
#   64x64 tiles, 4 warps, 2 stages:   455 / 468 / 304 (two programs per SM)
#   per-key gather (ops.paged_attention, pages of 16): 399 / 414 / 275
# Measured and dropped: warp specialisation (no change, and a compiler crash at 4 warps), 256-row
# tiles, 32-key tiles with two or three programs per SM (all slower), two exponentials per
# instruction in bf16x2 (same speed: the softmax is not bound by the exponential unit alone), and
# launching the heaviest query tiles of every head first (3-20% slower: more K/V in L2 at once).
LONG_TILE_CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}
TILE_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
MIN_PAGE = TILE_CONFIG["block_n"]


def choose_config(page_size: int, max_seq_len: int | None) -> dict:
    if page_size % LONG_TILE_CONFIG["block_n"] == 0 and (max_seq_len or 0) >= LONG_CONTEXT:
        return LONG_TILE_CONFIG
    return TILE_CONFIG


def supports(page_size: int, head_dim: int, kv_dtype: torch.dtype, block_n: int = MIN_PAGE) -> bool:
    """Whether this kernel can serve a cache: pages of whole key tiles, a power-of-two head, 16/32-bit,
    FP8 e4m3 or INT8 (with its scales) values."""
    return (page_size % block_n == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and kv_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      num_seqs: int, max_query_len: int, scale: float, max_seq_len: int | None = None,
                      tensor_copies: bool = False, config: dict | None = None, kv_scale: float = 1.0,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q, out: [T, Hq, D]; caches: [blocks, page, Hkv, D] with page a multiple of the key tile.
    kv_scale: what an FP8 cache's values are multiplied by (its per-tensor scale).
    k_scale, v_scale: an INT8 cache's scales, [blocks, page, Hkv] float32.
    tensor_copies: the platform has a tensor copy engine. Descriptors are then used from LONG_CONTEXT
    keys on, where the kernel runs long: each launch encodes two of them on the host (H100: 46-87 us
    per launch against 29-34 with pointer loads), which eager mixed steps would pay in every layer.
    config: tile sizes, warps and stages to override, and use_tma to force the choice."""
    long = (max_seq_len or 0) >= LONG_CONTEXT
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None or k_scale.shape != k_cache.shape[:3]
                 or k_scale.stride() != v_scale.stride()):
        raise ValueError("prefill_attention: an INT8 cache needs its k_scale and v_scale, [blocks, page, KV heads], "
                         "laid out alike")
    # (bulk copies of FP8 and INT8 tiles are not measured yet: pointer loads for those)
    cfg = {**choose_config(k_cache.shape[1], max_seq_len), "use_tma": tensor_copies and long and not (fp8 or int8)
           and TensorDescriptor is not None, **(config or {})}
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, page_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_n = cfg["block_n"]
    if not supports(page_size, head_dim, k_cache.dtype, block_n):
        raise ValueError(f"prefill_attention needs pages of whole {block_n}-key tiles and a power-of-two head dim,"
                         f" got page {page_size}, head dim {head_dim}, {k_cache.dtype}")
    block_q = max(1, min(cfg["block_m"] // group, triton.next_power_of_2(max_query_len)))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_stages = cfg["num_stages"]
    if config is None:  # halving a key tile keeps it a divisor of the page
        block_n, num_stages = launch.fit_key_tiles_for(q, k_cache, block_m, block_n, num_stages, head_dim)
    stride_row = num_kv_heads * head_dim
    if cfg["use_tma"]:
        rows = num_blocks * page_size
        k_arg = TensorDescriptor(k_cache, [rows, stride_row], [stride_row, 1], [block_n, head_dim])
        v_arg = TensorDescriptor(v_cache, [rows, stride_row], [stride_row, 1], [block_n, head_dim])
    else:
        k_arg, v_arg = k_cache, v_cache
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_attention_kernel[grid](
        q, k_arg, v_arg, out, block_table, seq_lens, query_start_loc,
        scale * LOG2E * (kv_scale * fp8_query_factor(q, True) if fp8 else 1.0), kv_scale if fp8 else 1.0,
        1.0 / fp8_query_factor(q, fp8), k_scale if int8 else q, v_scale if int8 else q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), stride_row, block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_TMA=cfg["use_tma"], NUM_KV_HEADS=num_kv_heads, INT8=int8, FP8=fp8,
        HEAD_MAJOR_SCALES=scales_head_major(k_scale) if int8 else False, num_warps=cfg["num_warps"],
        num_stages=num_stages, **launch.dependent_launch_kwargs())
    return out
