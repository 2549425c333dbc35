"""Paged attention in Triton: one kernel for prefill chunks and decodes of a mixed batch.

Each program takes BLOCK_Q query tokens of one sequence and all GROUP query heads that share one KV
head, packed as BLOCK_M = BLOCK_Q * GROUP rows, so every KV block is read once for the whole group.
Keys are walked BLOCK_N at a time through the block table (online softmax in fp32, exp2 domain).
With splits (decode of few, long sequences) the KV range is cut into splits whose partial results a
second small kernel merges ("flash-decoding"), so one sequence still fills the GPU. The split count is
an argument, not a constant of the compile: every plan that splits shares one compile.
Decode steps may hand over q/k/v before rotary (rope=...): each program then normalises and rotates
its own query rows, and the program that holds a sequence's last key writes the new k/v into the
cache first, so the step needs no separate rotary + cache-write launch.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.fp16_operand import fp16_operand, fp16_operand_factor
from sageinfer.ops.rope_cache import rms_norm_halves, scale_offsets, scales_head_major, store_kv

LOG2E = 1.4426950408889634
# A cascade's shared prefix is a whole multiple of this many keys, so the decode kernel's suffix starts on one of
# its key-tile boundaries (its tiles are 64 or 32 keys). It was 128: P1's 2,000 shared tokens (31 pages of 64)
# then gave the prefix 1,920 and left 64 more keys to every sequence's suffix.
PREFIX_ALIGN = 64
# Key tiles that lie in one page take its id in one load and their rows as a scalar base plus offsets that are
# the same every tile, instead of a page id, a slot and a 64-bit address per key. H200, decode batches, us a
# layer (benchmarks/experiments/probe_quantized_decode.py, 2026-12-04g, two runs each): FP8 cache 492 x 1,152
# keys 328.5 -> 320.7, 256 x 640 100.2 -> 96.3; INT8 382.2 -> 376.9, 114.4 -> 110.9; bf16 256 x 640 160.1 ->
# 157.5. SAGEINFER_ONE_PAGE_TILES=0 turns it off.
ONE_PAGE_TILES = tl.constexpr(os.environ.get("SAGEINFER_ONE_PAGE_TILES", "1") != "0")


@triton.jit
def _load_key_rows(ptrs, k_valid, dim_valid, MASKED: tl.constexpr, DIM_PADDED: tl.constexpr):
    """A tile's [keys, dims] rows, masked only where a key or a dim can be out of range."""
    if MASKED:
        rows = tl.load(ptrs, mask=k_valid[:, None] & dim_valid[None, :], other=0.0)
    elif DIM_PADDED:
        rows = tl.load(ptrs, mask=dim_valid[None, :], other=0.0)
    else:
        rows = tl.load(ptrs)
    return rows


@triton.jit
def _load_per_key(ptrs, k_valid, MASKED: tl.constexpr):
    """One value per key of the tile (its block id, its int8 scale)."""
    if MASKED:
        scales = tl.load(ptrs, mask=k_valid, other=0.0)
    else:
        scales = tl.load(ptrs)
    return scales


@triton.jit
def attend_tile(q, m_i, l_i, acc, tile, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, seq,
                kv_head, kv_end, q_pos, dims, dim_valid, scale_log2, stride_c_block, stride_c_slot, stride_c_head,
                stride_bt, NUM_KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, KV_MODE: tl.constexpr, DIM_PADDED: tl.constexpr,
                HEAD_MAJOR_SCALES: tl.constexpr = False):
    """One key tile of online softmax. Unmasked tiles (every key valid and visible to every row) load
    without per-key masks and scale the scores inside one multiply-add; with K loaded key-major this
    took the 16K chunks of a 32K prompt on an H100 from 362-380 to 392-416 TFLOP/s
    (benchmarks/experiments/probe_prefill_attention.py)."""
    k_idx = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_valid = k_idx < kv_end
    if ONE_PAGE_TILES and PAGE_SIZE % BLOCK_N == 0:  # the tile's page is one load, its rows one offset
        first = tile * BLOCK_N
        page = tl.load(block_table_ptr + seq * stride_bt + first // PAGE_SIZE)
        in_page = first % PAGE_SIZE
        slot = in_page + tl.arange(0, BLOCK_N)
        tile_base = page.to(tl.int64) * stride_c_block + in_page * stride_c_slot + kv_head * stride_c_head
        row_offs = (tl.arange(0, BLOCK_N) * stride_c_slot)[:, None] + dims[None, :]  # the same every tile
    else:
        page = _load_per_key(block_table_ptr + seq * stride_bt + k_idx // PAGE_SIZE, k_valid, MASKED)
        slot = k_idx % PAGE_SIZE
        tile_base = 0
        row_offs = (page.to(tl.int64) * stride_c_block + slot * stride_c_slot + kv_head * stride_c_head)[:, None] + \
            dims[None, :]
    # K is loaded key-major like V (rows of contiguous dims) and transposed for the dot.
    k = _load_key_rows(k_cache_ptr + tile_base + row_offs, k_valid, dim_valid, MASKED, DIM_PADDED)
    # Quantised caches: int8 and fp8 values are exact in the query's dtype; scales are applied to
    # the scores (K) and the probabilities (V) instead of to every element. INT8 is cast directly:
    # through fp32's bits (ops/int8_values.py, the GEMV's way) decode took 151.5 us per layer against
    # 138.4 cast (H200, batch 256 x 640 keys, experiments/probe_quantized_decode.py).
    s = tl.dot(q, k.to(q.dtype).T)
    if KV_MODE == 2:
        scale_offs = scale_offsets(page.to(tl.int64), slot, kv_head, NUM_KV_HEADS, PAGE_SIZE, HEAD_MAJOR_SCALES)
        s = s * _load_per_key(k_scale_ptr + scale_offs, k_valid, MASKED)[None, :]
    if MASKED:
        s = tl.where(k_valid[None, :] & (k_idx[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_key_rows(v_cache_ptr + tile_base + row_offs, k_valid, dim_valid, MASKED, DIM_PADDED)
    pv = p
    if KV_MODE == 2:
        pv = p * _load_per_key(v_scale_ptr + scale_offs, k_valid, MASKED)[None, :]
    acc = tl.dot(pv.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def query_for_cache(q, fp8_query_scale, FP8_CACHE: tl.constexpr):
    """The query as the tiles' dots take it: over an FP8 cache in fp16 (ops/fp16_operand.py)."""
    if FP8_CACHE:
        q = fp16_operand(q, fp8_query_scale)
    return q


def fp8_query_factor(q: torch.Tensor, fp8_cache: bool) -> float:
    """What query_for_cache divides q by (the launcher multiplies the scores' scale by it)."""
    return fp16_operand_factor(q) if fp8_cache else 1.0


@triton.jit
def rotated_query(q_ptr, row_offs, row_valid, q_norm_ptr, cos_sin_ptr, pos, dims, eps,
                  HEAD_DIM: tl.constexpr, QK_NORM: tl.constexpr):
    """Query rows normalised (Qwen3's q norm) and rotated as ops.rope_cache does it, in registers.
    Each element pairs with the one half a head away: out = x cos + partner sin (-sin in the first half).
    row_offs: [rows, 1], where each row's head starts in q; pos: the rows' offset into cos_sin (position x its
    stride), one for all or one a row ([rows, 1])."""
    half = HEAD_DIM // 2
    partner = (dims + half) % HEAD_DIM
    x = tl.load(q_ptr + row_offs + dims[None, :], mask=row_valid[:, None], other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    y = tl.load(q_ptr + row_offs + partner[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + eps)[:, None]
        x = ((x * rstd).to(dtype) * tl.load(q_norm_ptr + dims)[None, :]).to(tl.float32)
        y = ((y * rstd).to(dtype) * tl.load(q_norm_ptr + partner)[None, :]).to(tl.float32)
    cos = tl.load(cos_sin_ptr + pos + (dims % half)[None, :])
    sin = tl.load(cos_sin_ptr + pos + half + (dims % half)[None, :])
    return (x * cos + y * tl.where((dims < half)[None, :], -sin, sin)).to(dtype)


@triton.jit
def _write_new_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_norm_ptr, cos_sin_ptr, pos,
                  slot, tok, kv_head, eps, fp8_inv_scale, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
                  stride_c_slot, stride_c_head, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  QK_NORM: tl.constexpr, KV_MODE: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  HEAD_MAJOR_SCALES: tl.constexpr):
    """One token's k (normalised, rotated) and v of one KV head into its cache slot, as ops.rope_cache."""
    half = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM // 2)
    head_mask = tl.arange(0, 2) == 0  # a [2, half] tile with one live row: the helpers work on head rows
    kh = kv_head + tl.arange(0, 2)
    mask = head_mask[:, None] & (d < half)[None, :]
    k_base = k_ptr + tok * stride_k_tok + kh[:, None] * stride_k_head + d[None, :]
    k1 = tl.load(k_base, mask=mask, other=0.0)
    dtype = k1.dtype
    k1, k2 = k1.to(tl.float32), tl.load(k_base + half, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = rms_norm_halves(k1, k2, k_norm_ptr, d, d < half, eps, dtype, HEAD_DIM)
    cos = tl.load(cos_sin_ptr + pos + d)[None, :]
    sin = tl.load(cos_sin_ptr + pos + half + d)[None, :]
    v_base = v_ptr + tok * stride_v_tok + kh[:, None] * stride_v_head + d[None, :]
    v1 = tl.load(v_base, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(v_base + half, mask=mask, other=0.0).to(tl.float32)
    c_base = slot * stride_c_slot + kh[:, None] * stride_c_head + d[None, :]
    scale_offs = scale_offsets(slot // PAGE_SIZE, slot % PAGE_SIZE, kh, NUM_KV_HEADS, PAGE_SIZE, HEAD_MAJOR_SCALES)
    store_kv(k_cache_ptr, k_scale_ptr, c_base, half, scale_offs, mask, head_mask, k1 * cos - k2 * sin,
             k2 * cos + k1 * sin, fp8_inv_scale, KV_MODE)
    store_kv(v_cache_ptr, v_scale_ptr, c_base, half, scale_offs, mask, head_mask, v1, v2, fp8_inv_scale, KV_MODE)


# Sizes that change from step to step are not specialised on (value 1, divisibility by 16): each
# new specialisation is a compilation in the middle of serving.
@triton.jit(do_not_specialize=["num_tokens", "prefix_splits", "stride_bt", "block_table_ptr", "seq_lens_ptr",
                                "query_start_loc_ptr", "num_splits", "min_split_tiles"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_table_ptr, seq_lens_ptr, query_start_loc_ptr, k_scale_ptr, v_scale_ptr,
    prefix_out_ptr, prefix_lse_ptr, prefix_len_ptr, num_tokens, prefix_splits, num_splits, min_split_tiles,
    scale_log2, out_scale, fp8_query_scale,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt,
    positions_ptr, k_new_ptr, v_new_ptr, cos_sin_ptr, slot_mapping_ptr, q_norm_ptr, k_norm_ptr, eps, fp8_inv_scale,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_cs,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, NUM_KV_HEADS: tl.constexpr, KV_MODE: tl.constexpr, CASCADE: tl.constexpr,
    ROPE: tl.constexpr, QK_NORM: tl.constexpr, USE_PDL: tl.constexpr, HEAD_MAJOR_SCALES: tl.constexpr = False,
):
    launch.wait_for_previous_kernel(USE_PDL)
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    if SPLIT:  # the split count and least split are arguments: one compile serves every plan that splits
        kv_head = tl.program_id(2) // num_splits
        split = tl.program_id(2) % num_splits
    else:
        kv_head = tl.program_id(2)
        split = 0

    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    kv_end = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, query_len)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if SPLIT:
        tiles_per_split = _tiles_per_split(num_tiles, num_splits, min_split_tiles)
        if split * tiles_per_split >= num_tiles:  # a short sequence's unused split: the merge does not read it
            return  # (before the query's loads and rotary: most programs of an even batch's ragged plan)
    else:
        tiles_per_split = num_tiles

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < query_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    row_offs = (q_start + q_idx)[:, None] * stride_q_tok + head[:, None] * stride_q_head
    if ROPE:  # decode (one query token): q/k/v arrive before rotary
        pos = tl.load(positions_ptr + q_start) * stride_cs
        q = rotated_query(q_ptr, row_offs, row_valid, q_norm_ptr, cos_sin_ptr, pos, dims, eps, HEAD_DIM, QK_NORM)
    else:
        q = tl.load(q_ptr + row_offs + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    q = query_for_cache(q, fp8_query_scale, KV_MODE == 1)
    q_pos = context_len + q_idx  # causal: a query sees keys at positions <= its own

    prefix_len = 0
    if CASCADE:  # cascade decode: the shared prefix was attended by prefix_attention
        prefix_len = tl.load(prefix_len_ptr)
        tile_start = prefix_len // BLOCK_N
    else:
        tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    if ROPE:
        slot = tl.load(slot_mapping_ptr + q_start)
        if (tile_end == num_tiles) & (tile_start < tile_end) & (slot >= 0):  # this program reads the new key
            _write_new_kv(k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_norm_ptr,
                          cos_sin_ptr, pos, slot, q_start, kv_head, eps, fp8_inv_scale, stride_k_tok, stride_k_head,
                          stride_v_tok, stride_v_head, stride_c_slot, stride_c_head, NUM_KV_HEADS, HEAD_DIM, QK_NORM,
                          KV_MODE, PAGE_SIZE, HEAD_MAJOR_SCALES)
        tl.debug_barrier()  # the whole program sees the new key before its tiles load it
    # Tiles wholly at or before the tile's first query position need no mask.
    num_full = (context_len + q_tile * BLOCK_Q + 1) // BLOCK_N
    mid = tl.maximum(tl.minimum(tile_end, num_full), tile_start)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for tile in range(tile_start, mid):
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, tile, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                     block_table_ptr, seq, kv_head, kv_end, q_pos, dims, dim_valid, scale_log2,
                                     stride_c_block, stride_c_slot, stride_c_head, stride_bt, NUM_KV_HEADS, PAGE_SIZE,
                                     BLOCK_N, False, KV_MODE, HEAD_DIM != HEAD_DIM_PAD, HEAD_MAJOR_SCALES)
    for tile in range(mid, tile_end):
        m_i, l_i, acc = attend_tile(q, m_i, l_i, acc, tile, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                     block_table_ptr, seq, kv_head, kv_end, q_pos, dims, dim_valid, scale_log2,
                                     stride_c_block, stride_c_slot, stride_c_head, stride_bt, NUM_KV_HEADS, PAGE_SIZE,
                                     BLOCK_N, True, KV_MODE, HEAD_DIM != HEAD_DIM_PAD, HEAD_MAJOR_SCALES)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * out_scale
    tok = q_start + q_idx
    if prefix_len > 0:  # merge with the prefix partials, weighted by their log-sum-exps
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        m = lse
        for s in range(prefix_splits):
            m = tl.maximum(m, tl.load(prefix_lse_ptr + (s * num_tokens + tok) * NUM_HEADS + head, mask=row_valid,
                                      other=float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m)
        total = w
        out = out * w[:, None]
        for s in range(prefix_splits):
            base = (s * num_tokens + tok) * NUM_HEADS + head
            w = tl.math.exp2(tl.load(prefix_lse_ptr + base, mask=row_valid, other=float("-inf")) - m)
            part = tl.load(prefix_out_ptr + base[:, None] * HEAD_DIM_PAD + dims[None, :], mask=row_valid[:, None],
                           other=0.0)
            out += part * w[:, None]
            total += w
        out = out / tl.where(total == 0.0, 1.0, total)[:, None]
    # A sequence that one split covers writes its output itself and the merge passes it by (a batch whose
    # sequences are all short then costs little more than no split).
    whole = True
    if SPLIT:
        whole = tiles_per_split >= num_tiles
    if whole:
        o_offs = tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])
    else:
        # part_out: [tokens, heads, splits, HEAD_DIM_PAD] fp32; part_lse: [tokens, heads, splits]
        base = (tok * NUM_HEADS + head) * num_splits + split
        tl.store(part_out_ptr + base[:, None] * HEAD_DIM_PAD + dims[None, :], out, mask=row_valid[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + base, lse, mask=row_valid)


@triton.jit
def _tiles_per_split(num_tiles, num_splits, min_split_tiles):
    """Key tiles of each split: the sequence cut evenly in num_splits, and with min_split_tiles > 0 in
    splits of at least that many tiles (a short sequence then uses fewer splits than the batch's); at
    least one (a sequence of no keys uses no split)."""
    return tl.maximum(tl.maximum(tl.cdiv(num_tiles, num_splits), min_split_tiles), 1)


@triton.jit(do_not_specialize=["seq_lens_ptr", "min_split_tiles"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, seq_lens_ptr, stride_o_tok, stride_o_head, min_split_tiles,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, HEADS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One decode token's splits merged for HEADS of its heads (program_id(1) picks which)."""
    launch.wait_for_previous_kernel(USE_PDL)
    tok = tl.program_id(0)  # decode: token tok is sequence tok
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_PAD)
    num_tiles = tl.cdiv(tl.load(seq_lens_ptr + tok), BLOCK_N)
    num_used = tl.cdiv(num_tiles, _tiles_per_split(num_tiles, NUM_SPLITS, min_split_tiles))
    if num_used <= 1:  # its one split wrote the output
        return
    used = splits < num_used  # the unused splits wrote nothing
    if HEADS == 1:  # every split of the head in one load
        head = tl.program_id(1)
        base = (tok * NUM_HEADS + head) * NUM_SPLITS
        lse = tl.load(part_lse_ptr + base + splits, mask=used, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - m))
        parts = tl.load(part_out_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :], mask=used[:, None],
                        other=0.0)
        out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + tok * stride_o_tok + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
                 mask=dims < HEAD_DIM)
    else:  # the heads' weights at once, then their partial outputs a split at a time
        heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
        head_ok = heads < NUM_HEADS
        bases = (tok * NUM_HEADS + heads) * NUM_SPLITS
        lse = tl.load(part_lse_ptr + bases[:, None] + splits[None, :], mask=head_ok[:, None] & used[None, :],
                      other=float("-inf"))
        m = tl.max(lse, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # a masked head's: no NaN in its lanes
        total = tl.sum(tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - m[:, None])), 1)
        acc = tl.zeros([HEADS, HEAD_DIM_PAD], dtype=tl.float32)
        for s in range(0, num_used):
            lse_s = tl.load(part_lse_ptr + bases + s, mask=head_ok, other=float("-inf"))
            w = tl.where(lse_s == float("-inf"), 0.0, tl.math.exp2(lse_s - m))
            acc += tl.load(part_out_ptr + (bases + s)[:, None] * HEAD_DIM_PAD + dims[None, :], mask=head_ok[:, None],
                           other=0.0) * w[:, None]
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        tl.store(out_ptr + tok * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (dims < HEAD_DIM)[None, :])


# Heads a merge program takes (SAGEINFER_MERGE_HEADS, a power of two). One, the default, gives a batch of
# 559 sequences x 32 heads 17,888 merge programs, most of which read a sequence length and return (a
# sequence that one split covers needs no merge); chat-mix's merges took 0.90 s of its 47 s on an H200,
# 20 us a launch (2026-12-05b). More heads a program launch fewer programs but walk the splits in turn. On an
# H200 (2026-12-05d) four heads took a layer's decode attention of 64-559 chat-like sequences 2.2-2.6% lower
# and one sequence's 2-16% higher: one stays the default, since a per-batch choice is a second compile.
# Merging in the split program that stores its partials last (an atomic count per sequence and KV head, no
# merge launch) lost on an H100 (2026-12-05f): one sequence of 8,000 keys 21.6 against 14.1 us a layer, as
# one program walks the 32 splits in turn; chat-like batches level; chat-mix +0.3%.
MERGE_HEADS = int(os.environ.get("SAGEINFER_MERGE_HEADS", "1"))


# Sequences of this many keys or more may take LONG_DECODE_SPLITS splits instead of 32 (a graph plans for
# max_model_len, so with max_model_len from here every single-stream decode step is planned for 64). At
# one sequence of 32K keys on an H200, 64 splits took 33.1 / 37.6 / 39.5 us a layer (FP8 / INT8 / bf16
# caches) against 44.8 / 50.1 / 42.2 with 32 (experiments/probe_quantized_decode.py); through the engine,
# L2's TPOT went 6.30 -> 5.87 ms (FP8), 6.57 -> 6.03 (INT8), 6.13 -> 6.12 (bf16), L1's 4.83 -> 4.91 (bf16;
# benchmarks/results/2026-12-02d-h200-decode-plan-and-scheduling.md). SAGEINFER_LONG_DECODE_KEYS moves it.
LONG_DECODE_KEYS = int(os.environ.get("SAGEINFER_LONG_DECODE_KEYS", "32768"))
LONG_DECODE_SPLITS = 64


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits so that decode programs cover the GPU about twice, each split at least 256 keys."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    by_occupancy = triton.next_power_of_2(max(1, (2 * num_sms) // programs))
    by_length = triton.next_power_of_2(max(1, max_seq_len // 256))
    # 32 at most below LONG_DECODE_KEYS: one sequence of 640 keys takes 8.3 us per layer with 32 splits,
    # 9.9 with 64 when the merge reads every split (tune_decode_step.py, H100). From 32K keys 64 stream
    # the cache faster (H200, one sequence, 8 KV heads: 128K keys 142 -> 130 us per layer, 64K 75 -> 70
    # us; 128 and 256 were slower: experiments/tune_long_decode.py).
    cap = LONG_DECODE_SPLITS if max_seq_len >= LONG_DECODE_KEYS else 32
    return max(1, min(by_occupancy, by_length, cap))


# Launch configurations of prefill tiles, from benchmarks/experiments/tune_attention.py on an H100 (bf16, head dim
# 128, GQA 4): long contexts want wide key tiles (362 / 377 TFLOP/s for the two 16K chunks of a 32K
# prompt, 374 for 8192 queries after 24000 keys), short prompts narrow ones (265 TFLOP/s for 16 x 1024).
# Launching the heaviest causal tiles first was tried and measured 1-3% slower.
PREFILL_CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3}
SHORT_PREFILL_CONFIG = {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3}
LONG_CONTEXT = 4096
# Decode programs (one query token x GROUP heads): keys per tile, warps, stages, per cache dtype mode.
# From benchmarks/experiments/probe_quantized_decode.py on an H200, batch 256 x 640 keys, us per layer
# with 3 stages -> 2: bf16 163.2 -> 162.2, fp8 134.7 -> 121.9, int8 151.5 -> 142.5 (133.8 with INT8 also
# cast directly); 64 x 4096 keys: 245.8 both, 180.2 -> 171.2, 210.5 -> 204.1. Wider tiles and 4 warps
# were slower at these batches.
# The quantised caches stream fewer bytes per second than bf16 (2.4-2.8 against 4.1-4.4 TB/s): they
# are bound by each tile's latency, not by bandwidth.
DECODE_CONFIG = {mode: {"block_n": 64, "num_warps": 2, "num_stages": 2} for mode in (0, 1, 2)}
# Wide decode batches (the Triton backend's plan: one split, programs for 8 or more an SM) over an FP8 or
# INT8 cache: 32-key tiles of one warp, twice the programs an SM holds. H200, us a layer
# (probe_quantized_decode.py, 2026-12-04c-h200-one-row-activate-words.md): 256 sequences x 640 keys FP8
# 121.7 -> 100.8, INT8 133.5 -> 113.2; with 512 programs (64 x 4096 keys) they lost, FP8 171.9 -> 222.5,
# INT8 196.1 -> 245.4 (hence the plan's bound). bf16 gained 3% (162.0 -> 157.7), within what a rerun moves,
# and keeps its tiles.
WIDE_DECODE_CONFIGS = {mode: {"block_n": 32, "num_warps": 1, "num_stages": 2} for mode in (1, 2)}


def rotary_inside_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode attention can take q/k/v before rotary (rope=...): head dims the kernel does not
    pad (powers of two from 16: no padded lanes to pair) and cache pages laid out back to back (slots
    address rows directly)."""
    head_dim = q.shape[2]
    return (head_dim == max(16, triton.next_power_of_2(head_dim))
            and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    num_seqs: int, max_query_len: int, scale: float, num_splits: int = 1,
                    config: dict | None = None, max_seq_len: int | None = None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, kv_mode: int = 0,
                    fp8_scale: float = 1.0, prefix: tuple | None = None, rope: tuple | None = None,
                    min_split_keys: int = 0) -> torch.Tensor:
    """q, out: [T, Hq, D]; caches: [blocks, page, Hkv, D]. Writes out and returns it.
    prefix: (part_out, part_lse, prefix_len) from ops.cascade_attention.prefix_attention for a decode
    batch with one split: keys before prefix_len, a multiple of the key tile, are taken from there
    instead of the cache (with rope, prefix_attention must have rotated the query the same way).
    rope: (positions, k, v, cos_sin_cache, slot_mapping, q_norm_weight, k_norm_weight, eps) for a decode
    batch whose q, k, v ([T, H, D] views) are not yet rotated nor cached: done here, as
    ops.rope_cache.rope_and_cache would (q is not written back).
    min_split_keys: a decode batch's splits hold at least this many keys (rounded up to key tiles), so
    that a short sequence uses fewer of num_splits than a long one (0: every sequence cut in num_splits)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    cfg = config or (SHORT_PREFILL_CONFIG if max_seq_len is not None and max_seq_len < LONG_CONTEXT
                     else PREFILL_CONFIG)
    if max_query_len == 1:
        block_q = 1
    else:
        block_q = max(1, min(cfg["block_m"] // group, triton.next_power_of_2(max_query_len)))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    if max_query_len == 1:
        dcfg = config or DECODE_CONFIG[kv_mode]
        block_n, num_warps, num_stages = dcfg["block_n"], dcfg["num_warps"], dcfg["num_stages"]
    else:
        block_n = cfg["block_n"] if block_m >= 64 else 32
        num_warps = cfg["num_warps"] if block_m >= 128 else 4
        num_stages = cfg["num_stages"] if block_m >= 64 else 2
        if config is None:
            block_n, num_stages = launch.fit_key_tiles_for(q, k_cache, block_m, block_n, num_stages, head_dim_pad)
    num_splits = num_splits if max_query_len == 1 else 1
    min_split_tiles = triton.cdiv(min_split_keys, block_n) if num_splits > 1 else 0
    if prefix is not None and (max_query_len != 1 or num_splits != 1):
        raise ValueError("cascade attention takes decode batches with one split")
    if prefix is not None and PREFIX_ALIGN % block_n:  # the suffix would start inside a tile the prefix holds
        raise ValueError(f"cascade attention needs key tiles that divide {PREFIX_ALIGN}, got {block_n}")
    prefix_out, prefix_lse, prefix_len = prefix if prefix is not None else (q, q, seq_lens)
    if rope is not None and (max_query_len != 1 or not rotary_inside_supported(q, k_cache)):
        raise ValueError("rotary inside attention takes decode batches, power-of-two head dims and contiguous "
                         "cache pages")
    positions, k_new, v_new, cos_sin, slot_mapping, q_norm, k_norm, eps = rope if rope is not None else (
        seq_lens, q, q, q, seq_lens, None, None, 0.0)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_splits)
    if num_splits > 1:
        part_out = torch.empty(q.shape[0], num_heads, num_splits, head_dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(q.shape[0], num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_lse, block_table, seq_lens, query_start_loc,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
        prefix_out, prefix_lse, prefix_len, q.shape[0], prefix_out.shape[0] if prefix is not None else 0,
        num_splits, min_split_tiles,
        scale * LOG2E * (fp8_scale * fp8_query_factor(q, kv_mode == 1) if kv_mode == 1 else 1.0),
        fp8_scale if kv_mode == 1 else 1.0, 1.0 / fp8_query_factor(q, kv_mode == 1),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        positions, k_new, v_new, cos_sin, slot_mapping, q_norm if q_norm is not None else q,
        k_norm if k_norm is not None else q, eps, 1.0 / fp8_scale,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos_sin.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE_SIZE=page_size,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=num_splits > 1, NUM_KV_HEADS=num_kv_heads,
        KV_MODE=kv_mode, CASCADE=prefix is not None, ROPE=rope is not None, QK_NORM=q_norm is not None,
        HEAD_MAJOR_SCALES=scales_head_major(k_scale) if kv_mode == 2 else False,
        num_warps=num_warps, num_stages=num_stages,
        **launch.dependent_launch_kwargs())
    if num_splits > 1:
        heads = min(triton.next_power_of_2(max(1, MERGE_HEADS)), triton.next_power_of_2(num_heads))
        _merge_splits_kernel[(q.shape[0], triton.cdiv(num_heads, heads))](
            part_out, part_lse, out, seq_lens, out.stride(0), out.stride(1), min_split_tiles,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
            BLOCK_N=block_n, HEADS=heads,
            **launch.dependent_launch_kwargs())
    return out
