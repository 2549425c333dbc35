"""Experiment, not used by the engine: prefill attention for NVIDIA Hopper in Gluon (Triton's
explicit-layout language), measured against the portable kernel by benchmarks/probe_hopper_attention.py.
Result (H100, 2026-11-24-h100-gluon-prefill-attention.json): on the 16K chunks of a 32K prompt it
matches ops.prefill_attention with 128-key tiles (465-475 / 485-491 TFLOP/s), and with 64x64 tiles
on 64-token pages it is 0-4% faster there and 4-20% faster on 1K prompts; far from the ~540 TFLOP/s
the L2 target needs. Its successor, with a copy warp and two ping-pong consumer warpgroups, reaches
613-654 and is the engine's (sageinfer/platforms/hopper_attention.py).

The portable kernel (ops.prefill_attention) leaves tensor-core work and softmax in lockstep: the
compiler waits for every warpgroup MMA as soon as it is issued. Here the waits are ours, so each
key tile overlaps the softmax of tile j with the tensor cores computing P(j-1) V(j-1), as
FlashAttention-3 does inside a warpgroup:

    S(j) = Q K(j)^T  (async)       O += P(j-1) V(j-1)  (async)
    wait S(j); softmax(S(j)) -> P(j), alpha(j)      # while P(j-1) V(j-1) runs
    wait O; O *= alpha(j)

The overlap is there in the machine code (the softmax's exponentials sit between the wait for S(j)
and the wait for P(j-1) V(j-1)), yet it measured no faster: Nsight Compute shows the tensor pipe
~52% busy for both kernels, with warps stalled on the per-tile barrier and on MMA waits (1.7 cycles
each per issued instruction). Two warpgroups of one program still run in lockstep; FlashAttention-3
gets past this by ordering them (ping-pong) and by a producer warp that issues the copies.

K and V move by bulk tensor copies into two stages each, one tile (two 64-key pages, or one page of
128 or more) ahead. Rows are packed as in ops.paged_attention: BLOCK_M = 128 rows of BLOCK_Q query
tokens x GROUP heads that share one KV head. Same contract as ops.prefill_attention.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
CONFIG = {"block_m": 128, "block_n": 128, "num_warps": 8}


@gluon.jit
def _tile_rows(table, tile, last_key, PAGE_SIZE: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
    """Cache rows where key tile `tile`'s (at most two) runs of ROWS keys start. Runs past the sequence's
    last key re-read its last run (masked later), so any tile index is safe to ask for."""
    key0 = gl.minimum(tile * BLOCK_N, last_key)
    row0 = gl.load(table + key0 // PAGE_SIZE) * PAGE_SIZE + (key0 % PAGE_SIZE) // ROWS * ROWS
    row1 = row0
    if BLOCK_N // ROWS == 2:
        key1 = gl.minimum(tile * BLOCK_N + ROWS, last_key)
        row1 = gl.load(table + key1 // PAGE_SIZE) * PAGE_SIZE + (key1 % PAGE_SIZE) // ROWS * ROWS
    return row0, row1


@gluon.jit
def _issue_tile(desc, smem, bar, rows, col, ROWS: gl.constexpr, BLOCK_N: gl.constexpr):
    """Bulk-copy one key tile of one KV head (rows from _tile_rows) into smem."""
    mbarrier.expect(bar, desc.block_type.nbytes * (BLOCK_N // ROWS))
    tma.async_copy_global_to_shared(desc, [rows[0], col], bar, smem.slice(0, ROWS))
    if BLOCK_N // ROWS == 2:
        tma.async_copy_global_to_shared(desc, [rows[1], col], bar, smem.slice(ROWS, ROWS))


@gluon.jit
def _softmax(s, m_i, l_i, tile, q_pos, kv_end, scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
             MASKED: gl.constexpr):
    if MASKED:  # the causal band and the sequence's end: mask what a row may not see
        k_idx = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (k_idx[None, :] <= q_pos[:, None]) & (k_idx[None, :] < kv_end)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
    p = gl.exp2(s * scale_log2 - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, alpha


@gluon.jit
def _zero_rows_past_end(v_tile, tile, kv_end, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                        num_warps: gl.constexpr):
    """Rows of the sequence's last page past its end were never written (0 * NaN would poison O)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    v = v_tile.load(layout)
    k_idx = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    v_tile.store(gl.where((k_idx < kv_end)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _step(tile, acc, p_prev, m_i, l_i, v_rows, k_rows, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, table,
          last_key, col, num_tiles, num_full, q_pos, kv_end, scale_log2, s_zero, s_layout: gl.constexpr,
          o_layout: gl.constexpr,
          p_layout: gl.constexpr, PAGE_SIZE: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
          HEAD_DIM: gl.constexpr, MASKED: gl.constexpr, num_warps: gl.constexpr):
    """Key tile `tile`: S(tile) and P(tile - 1) V(tile - 1) on the tensor cores while the softmax of
    S(tile) runs. Both MMAs are issued from one basic block: with a branch between them the assembler
    no longer tells their groups apart and waits for both before the softmax. v_rows / k_rows: cache
    rows of tiles tile + 1 and tile + 2, read from the block table one step early so that the read's
    latency is not paid before the copies are issued."""
    st = tile % 2
    prev = 1 - st
    mbarrier.wait(k_bar.index(st), (tile // 2) & 1)
    mbarrier.wait(v_bar.index(prev), ((tile - 1) // 2) & 1)
    if MASKED:
        if tile - 1 >= num_full:
            _zero_rows_past_end(v_smem.index(prev), tile - 1, kv_end, BLOCK_N, HEAD_DIM, num_warps)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    acc = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
    p, m_i, l_i, alpha = _softmax(s, m_i, l_i, tile, q_pos, kv_end, scale_log2, s_layout, BLOCK_N, MASKED)
    dtype: gl.constexpr = q_smem.dtype
    p_next = gl.convert_layout(p.to(dtype), p_layout)
    # P(tile - 1) stays a dependency until its MMA is done: the MMA reads it from registers, which
    # P(tile) must not reuse.
    acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    if num_warps > 4:  # the other warpgroup may still read K(tile) and V(tile - 1); one warpgroup's
        gl.thread_barrier()  # MMAs are collective, so its wait already covers every warp
    if tile + 2 < num_tiles:
        _issue_tile(k_desc, k_smem.index(st), k_bar.index(st), k_rows, col, ROWS, BLOCK_N)
    if tile + 1 < num_tiles:
        _issue_tile(v_desc, v_smem.index(prev), v_bar.index(prev), v_rows, col, ROWS, BLOCK_N)
    return acc, p_next, m_i, l_i, k_rows, _tile_rows(table, tile + 3, last_key, PAGE_SIZE, ROWS, BLOCK_N)


@gluon.jit(do_not_specialize=["stride_bt"])
def _hopper_prefill_kernel(
    q_ptr, k_desc, v_desc, out_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr, scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head, stride_bt,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, PAGE_SIZE: gl.constexpr, BLOCK_Q: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr,
):
    seq = gl.program_id(0)
    q_tile = gl.program_id(1)
    kv_head = gl.program_id(2)
    q_start = gl.load(query_start_loc_ptr + seq)
    query_len = gl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= query_len:
        return
    context_len = gl.load(seq_lens_ptr + seq) - query_len
    kv_end = context_len + gl.minimum((q_tile + 1) * BLOCK_Q, query_len)
    num_tiles = gl.cdiv(kv_end, BLOCK_N)
    num_full = (context_len + q_tile * BLOCK_Q + 1) // BLOCK_N
    table = block_table_ptr + seq.to(gl.int64) * stride_bt
    col = kv_head * HEAD_DIM
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    ROWS: gl.constexpr = k_desc.block_type.shape[0]

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    # Q once into shared memory (the A operand of every S = Q K^T).
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    tok = (q_start + q_idx).to(gl.int64)
    q = gl.load(q_ptr + tok[:, None] * stride_q_tok + (kv_head * GROUP + rows % GROUP)[:, None] * stride_q_head
                + dims[None, :], mask=(q_idx < query_len)[:, None], other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype))
    q_smem.store(q)

    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()

    last_key = kv_end - 1
    for i in gl.static_range(2):
        if i < num_tiles:
            rows_i = _tile_rows(table, i, last_key, PAGE_SIZE, ROWS, BLOCK_N)
            _issue_tile(k_desc, k_smem.index(i), k_bar.index(i), rows_i, col, ROWS, BLOCK_N)
            _issue_tile(v_desc, v_smem.index(i), v_bar.index(i), rows_i, col, ROWS, BLOCK_N)
    v_rows = _tile_rows(table, 2, last_key, PAGE_SIZE, ROWS, BLOCK_N)
    k_rows = _tile_rows(table, 3, last_key, PAGE_SIZE, ROWS, BLOCK_N)

    q_pos = context_len + q_tile * BLOCK_Q + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout)) // GROUP
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    # Tile 0: scores and softmax; its P V is issued with the next tile's scores.
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False)
    if num_full == 0:
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, q_pos, kv_end, scale_log2, s_layout, BLOCK_N, True)
    else:
        p, m_i, l_i, alpha = _softmax(s, m_i, l_i, 0, q_pos, kv_end, scale_log2, s_layout, BLOCK_N, False)
    p_prev = gl.convert_layout(p.to(dtype), p_layout)
    gl.thread_barrier()  # both warpgroups are done with K(0): its stage takes K(2)
    if 2 < num_tiles:
        _issue_tile(k_desc, k_smem.index(0), k_bar.index(0), v_rows, col, ROWS, BLOCK_N)

    for tile in range(1, num_full):  # keys every row sees: no masks
        acc, p_prev, m_i, l_i, v_rows, k_rows = _step(
            tile, acc, p_prev, m_i, l_i, v_rows, k_rows, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, table,
            last_key, col, num_tiles, num_full, q_pos, kv_end, scale_log2, s_zero, s_layout, o_layout, p_layout,
            PAGE_SIZE, ROWS, BLOCK_N, HEAD_DIM, False, num_warps)
    for tile in range(gl.maximum(num_full, 1), num_tiles):  # the causal band and the sequence's end
        acc, p_prev, m_i, l_i, v_rows, k_rows = _step(
            tile, acc, p_prev, m_i, l_i, v_rows, k_rows, q_smem, k_smem, v_smem, k_bar, v_bar, k_desc, v_desc, table,
            last_key, col, num_tiles, num_full, q_pos, kv_end, scale_log2, s_zero, s_layout, o_layout, p_layout,
            PAGE_SIZE, ROWS, BLOCK_N, HEAD_DIM, True, num_warps)

    last = num_tiles - 1
    mbarrier.wait(v_bar.index(last % 2), (last // 2) & 1)
    if last >= num_full:
        _zero_rows_past_end(v_smem.index(last % 2), last, kv_end, BLOCK_N, HEAD_DIM, num_warps)
    acc = warpgroup_mma(p_prev, v_smem.index(last % 2), acc)
    for i in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    out = gl.convert_layout(out.to(dtype), io_layout)
    gl.store(out_ptr + tok[:, None] * stride_o_tok + (kv_head * GROUP + rows % GROUP)[:, None] * stride_o_head
             + dims[None, :], out, mask=(q_idx < query_len)[:, None])


def supports(page_size: int, head_dim: int, num_heads: int, num_kv_heads: int, kv_dtype: torch.dtype,
             config: dict | None = None) -> bool:
    """Pages of whole key tiles (or tiles of two whole pages), head dim 128, GQA groups that pack into
    the tile's rows, 16-bit KV."""
    cfg = config or CONFIG
    group, block_n = num_heads // num_kv_heads, cfg["block_n"]
    return (head_dim == 128 and page_size >= 64 and (page_size % block_n == 0 or block_n == 2 * page_size)
            and cfg["block_m"] % group == 0 and kv_dtype in (torch.float16, torch.bfloat16))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      num_seqs: int, max_query_len: int, scale: float, config: dict | None = None) -> torch.Tensor:
    """q, out: [T, Hq, D]; caches: [blocks, page, Hkv, D]. Same contract as ops.prefill_attention.
    config: block_m, block_n, num_warps to override CONFIG."""
    cfg = config or CONFIG
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, page_size, num_kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if not supports(page_size, head_dim, num_heads, num_kv_heads, k_cache.dtype, cfg):
        raise ValueError(f"hopper prefill attention: unsupported page {page_size}, head dim {head_dim}, "
                         f"{num_heads}/{num_kv_heads} heads, {k_cache.dtype}")
    group = num_heads // num_kv_heads
    block_q = cfg["block_m"] // group
    rows = min(page_size, cfg["block_n"])
    gl_dtype = gl.bfloat16 if k_cache.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)
    width = num_kv_heads * head_dim
    descs = [TensorDescriptor(c.view(num_blocks * page_size, width), [num_blocks * page_size, width], [width, 1],
                              [rows, head_dim], layout) for c in (k_cache, v_cache)]
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _hopper_prefill_kernel[grid](
        q, descs[0], descs[1], out, block_table, seq_lens, query_start_loc, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_Q=block_q, BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"])
    return out
