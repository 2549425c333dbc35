"""Cascade attention for decode batches whose sequences share a cached prefix (the same physical KV
blocks, as prefix caching leaves them).

Plain decode reads the shared prefix once per sequence. Here the prefix is attended once for all:
the queries of every sequence that share a KV head are packed as rows of one matrix
(batch x GROUP rows), so each prefix tile is loaded once per row tile and multiplied on the tensor
cores, like a prefill. The result per (token, head) is a partial output with its log-sum-exp, per
KV split; the decode kernel then attends each sequence's own suffix and merges the two
(paged_attention with `prefix=`). In a decode step both may take the query before rotary (rope=): each
rotates its own rows, and the decode kernel writes the new key and value, so the step launches no rotary kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.paged_attention import (LOG2E, PREFIX_ALIGN, attend_tile, fp8_query_factor, query_for_cache,
                                          rotary_inside_supported, rotated_query)
from sageinfer.ops.rope_cache import scales_head_major

# Rows (queries x heads of a group) per program, keys per tile. benchmarks/experiments/probe_p1.py, prefix +
# suffix of P1's 200 sequences (1,920 prefix keys, pages of 64), each shape at its prefix_splits: H200 FP8
# cache 124 us against 138 for the 128-row tiles of 8 warps (4 splits) used before, bf16 122 against 135
# (2026-12-04c-h200-one-row-activate-words.md); the H100 sweep had put six shapes within 149-161 us. With the
# prefix at 1,984 keys on an H100 (2026-12-05h): FP8 115.1 us, bf16 130.8, no shape of the sweep faster.
# The shared prefix is used in whole multiples of PREFIX_ALIGN (ops.paged_attention), so prefix tiles are full.
PREFIX_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
MAX_PREFIX_SPLITS = 16


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _prefix_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, prefix_blocks_ptr, prefix_len_ptr,
    part_out_ptr, part_lse_ptr, num_tokens, num_splits, scale_log2, out_scale, fp8_query_scale,
    stride_q_tok, stride_q_head, stride_c_block, stride_c_slot, stride_c_head,
    positions_ptr, cos_sin_ptr, q_norm_ptr, eps, stride_cs,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_MODE: tl.constexpr, USE_PDL: tl.constexpr, HEAD_MAJOR_SCALES: tl.constexpr = False,
    ROPE: tl.constexpr = False, QK_NORM: tl.constexpr = False,
):
    launch.wait_for_previous_kernel(USE_PDL)
    row_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(prefix_len_ptr)
    if prefix_len == 0:  # no shared prefix this step: the decode kernel reads no partials either
        return

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = tok < num_tokens
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    row_offs = tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
    if ROPE:  # each row its own token's position
        pos = tl.load(positions_ptr + tok, mask=row_valid, other=0) * stride_cs
        q = rotated_query(q_ptr, row_offs, row_valid, q_norm_ptr, cos_sin_ptr, pos[:, None], dims, eps, HEAD_DIM,
                          QK_NORM)
    else:
        q = tl.load(q_ptr + row_offs + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    q = query_for_cache(q, fp8_query_scale, KV_MODE == 1)

    # The prefix is a whole number of key tiles (PREFIX_ALIGN), so no tile needs a mask.
    num_tiles = prefix_len // BLOCK_N
    per_split = tl.cdiv(num_tiles, num_splits)
    tile_start = split * per_split
    tile_end = tl.minimum(tile_start + per_split, num_tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for tile in range(tile_start, tile_end):
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, tile, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                     prefix_blocks_ptr, 0, kv_head, prefix_len, rows,  # rows: no mask reads it
                                     dims, dim_valid, scale_log2,
                                     stride_c_block, stride_c_slot, stride_c_head, 0, NUM_KV_HEADS, PAGE_SIZE,
                                     BLOCK_N, False, KV_MODE, HEAD_DIM != HEAD_DIM_PAD, HEAD_MAJOR_SCALES)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None] * out_scale
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    # part_out: [splits, tokens, heads, HEAD_DIM_PAD] fp32; part_lse: [splits, tokens, heads]
    base = (split * num_tokens + tok) * NUM_HEADS + head
    tl.store(part_out_ptr + base[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_valid[:, None])
    tl.store(part_lse_ptr + base, lse, mask=row_valid)


def prefix_splits(num_tokens: int, group: int, num_kv_heads: int, num_sms: int,
                  block_m: int | None = None) -> int:
    """KV splits so that the prefix programs cover the GPU about twice."""
    row_tiles = triton.cdiv(num_tokens * group, block_m or PREFIX_CONFIG["block_m"])
    return max(1, min(MAX_PREFIX_SPLITS, (2 * num_sms) // (row_tiles * num_kv_heads)))


def prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefix_blocks: torch.Tensor,
                     prefix_len: torch.Tensor, scale: float, num_splits: int, config: dict | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, kv_mode: int = 0,
                     fp8_scale: float = 1.0, rope: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query token (one per sequence) over the shared prefix, without a mask.

    q: [T, Hq, D]; caches: [blocks, page, Hkv, D] in any cache dtype (kv_mode and scales as in
    ops.paged_attention); prefix_blocks: the prefix's block ids (int32, any row of the shared block
    table); prefix_len: int32 tensor [1], tokens, a multiple of PREFIX_ALIGN (0 = none).
    rope: (positions, cos_sin_cache, q_norm_weight or None, eps) for a query not yet rotated (as
    ops.paged_attention's rope=, whose decode kernel then writes the new keys; q is not written back).
    Returns (part_out [splits, T, Hq, D_pad] fp32, part_lse [splits, T, Hq] fp32 in log2 units)."""
    cfg = config or PREFIX_CONFIG
    if PREFIX_ALIGN % cfg["block_n"]:
        raise ValueError(f"prefix key tiles of {cfg['block_n']} do not divide PREFIX_ALIGN ({PREFIX_ALIGN})")
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    part_out = torch.empty(num_splits, num_tokens, num_heads, head_dim_pad, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
    block_n, num_stages = cfg["block_n"], cfg["num_stages"]
    if config is None:  # halving a key tile keeps it a divisor of PREFIX_ALIGN
        block_n, num_stages = launch.fit_key_tiles_for(q, k_cache, cfg["block_m"], block_n, num_stages, head_dim_pad)
    grid = (triton.cdiv(num_tokens * group, cfg["block_m"]), num_kv_heads, num_splits)
    fp8 = fp8_scale if kv_mode == 1 else 1.0
    if rope is not None and not rotary_inside_supported(q, k_cache):
        raise ValueError("rotary inside prefix attention takes power-of-two head dims and contiguous cache pages")
    positions, cos_sin, q_norm, eps = rope if rope is not None else (prefix_len, q, None, 0.0)
    _prefix_attention_kernel[grid](
        q, k_cache, v_cache, k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
        prefix_blocks, prefix_len, part_out, part_lse, num_tokens, num_splits,
        scale * LOG2E * fp8 * fp8_query_factor(q, kv_mode == 1), fp8, 1.0 / fp8_query_factor(q, kv_mode == 1),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        positions, cos_sin, q_norm if q_norm is not None else q, eps, cos_sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        PAGE_SIZE=page_size, BLOCK_M=cfg["block_m"], BLOCK_N=block_n, KV_MODE=kv_mode,
        HEAD_MAJOR_SCALES=scales_head_major(k_scale) if kv_mode == 2 else False,
        ROPE=rope is not None, QK_NORM=q_norm is not None, num_warps=cfg["num_warps"], num_stages=num_stages,
        **launch.dependent_launch_kwargs())
    return part_out, part_lse


def common_prefix_blocks(block_table, seq_lens, block_size: int) -> int:
    """Leading block ids that every row of a numpy block table shares, never reaching the block that
    holds a sequence's newest token."""
    first = block_table[0]
    limit = int((seq_lens.min() - 1) // block_size)
    if limit <= 0:
        return 0
    same = (block_table[:, :limit] == first[:limit]).all(axis=0)
    return limit if same.all() else int(same.argmin())
