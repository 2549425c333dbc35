"""Skinny matmul of 4-bit table weights (ops/lut4_weights.py's layout: bitsandbytes' NF4 and FP4) for decode
of a few sequences: y [M, N] = x [M, K] @ (table[code] * absmax)^T, read at four bits.

Expanding the weight for the library GEMM writes and reads it again at 16 bits (about 4.5 bytes a weight
against 2 for bf16 weights), which at a handful of rows costs more than the GEMM itself. Here each
program owns BLOCK_N output features and walks K BLOCKS scale blocks at a time: it loads the codes,
looks both nibbles of each byte up in the 16-value table (one 64-byte line, so the lookups hit the
first-level cache), multiplies by the inputs and by the block's absmax, and accumulates element-wise;
one reduction at the end. Portable Triton, no vendor instructions: every backend runs it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops.lut4_weights import check_lut4_layout

# Rows up to which layers take this kernel rather than expanding the weight; more rows share one
# expansion. Tiles per row count: the [M, BLOCK_N, BLOCKS, block / 2] accumulator stays in registers.
LUT4_GEMV_MAX_ROWS = 4
_TILES = {1: (8, 8), 2: (16, 2), 4: (8, 2)}  # BLOCK_M: (BLOCK_N, BLOCKS)
_NUM_WARPS = 4


@triton.jit
def _codes_and_scales(codes_ptr, absmax_ptr, rows, row_mask, stride_c, stride_a, block, n_blocks,
                      HALF: tl.constexpr):
    """The codes [1, BLOCK_N, BLOCKS, HALF] and absmax [1, BLOCK_N, BLOCKS, 1] of these scale blocks."""
    in_k = row_mask & (block < n_blocks)
    byte = tl.load(codes_ptr + rows * stride_c + block * HALF + tl.arange(0, HALF)[None, None, None, :], mask=in_k,
                   other=0)
    return byte.to(tl.int32), tl.load(absmax_ptr + rows * stride_a + block, mask=in_k, other=0.0)


@triton.jit(do_not_specialize=["M"])
def _lut4_gemv_kernel(x_ptr, codes_ptr, absmax_ptr, table_ptr, y_ptr, M, N, K, stride_xm, stride_c, stride_a,
                      stride_ym, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCKS: tl.constexpr, AHEAD: tl.constexpr):
    """AHEAD: the next step's codes and scales requested before this step's are looked up."""
    HALF: tl.constexpr = BLOCK // 2  # bytes of a scale block
    ms = tl.arange(0, BLOCK_M)[:, None, None, None]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None, None]
    bs = tl.arange(0, BLOCKS)[None, None, :, None]
    ps = tl.arange(0, HALF)[None, None, None, :]
    row_mask, m_mask = rows < N, ms < M
    n_blocks = K // BLOCK
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCKS, HALF), dtype=tl.float32)
    byte, scale = _codes_and_scales(codes_ptr, absmax_ptr, rows, row_mask, stride_c, stride_a, bs, n_blocks, HALF)
    for b0 in range(0, n_blocks, BLOCKS):
        block = b0 + bs
        if AHEAD:
            next_byte, next_scale = _codes_and_scales(codes_ptr, absmax_ptr, rows, row_mask, stride_c, stride_a,
                                                      block + BLOCKS, n_blocks, HALF)
        first = tl.load(table_ptr + (byte >> 4))  # the high nibble holds the even input's code
        second = tl.load(table_ptr + (byte & 0xF))
        k = block * BLOCK + 2 * ps
        in_k = m_mask & (block < n_blocks)
        x_even = tl.load(x_ptr + ms * stride_xm + k, mask=in_k, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + ms * stride_xm + k + 1, mask=in_k, other=0.0).to(tl.float32)
        acc += (x_even * first + x_odd * second) * scale
        if AHEAD:
            byte, scale = next_byte, next_scale
        else:  # requested only once this step's are used
            byte, scale = _codes_and_scales(codes_ptr, absmax_ptr, rows, row_mask, stride_c, stride_a, block + BLOCKS,
                                            n_blocks, HALF)
    y = tl.sum(tl.sum(acc, 3), 2)  # [BLOCK_M, BLOCK_N]
    ms2 = tl.arange(0, BLOCK_M)[:, None]
    rows2 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(y_ptr + ms2 * stride_ym + rows2, y.to(y_ptr.dtype.element_ty), mask=(ms2 < M) & (rows2 < N))


def lut4_gemv(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
              block: int, tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M at most LUT4_GEMV_MAX_ROWS) times the weight the codes encode, transposed: [M, N] in x's
    dtype. tile: (BLOCK_N, BLOCKS, warps, AHEAD) instead of the row count's (for timing)."""
    check_lut4_layout(codes, absmax, table, block)
    m, k = x.shape
    n = codes.shape[0]
    if m > LUT4_GEMV_MAX_ROWS or k != 2 * codes.shape[1] or block % 2:
        raise ValueError(f"4-bit table matmul: x {tuple(x.shape)} against codes {tuple(codes.shape)} in blocks of "
                         f"{block} (at most {LUT4_GEMV_MAX_ROWS} rows)")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    block_n, blocks, warps, ahead = tile or (*_TILES[block_m], _NUM_WARPS, 0)
    _lut4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, codes, absmax, table, y, m, n, k, x.stride(0), codes.stride(0), absmax.stride(0), y.stride(0),
        BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS=blocks, AHEAD=ahead, num_warps=warps)
    return y
