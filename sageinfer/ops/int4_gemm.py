"""A GEMM on 4-bit words for batches past the tensor-core skinny kernel's rows: each trip reads a run of
WORDS words a weight row once and takes all eight of their nibbles (columns j * SLICE + w of the run),
eight dots of WORDS columns each with the x columns they stand for. The weights are the dot's first
operand (y^T = W x^T), so that on sm_90 they go to the tensor cores from registers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops.split_k import add_parts, split_launch


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                      part_ptr, counter_ptr, k_per_split, GROUP: tl.constexpr, SLICE: tl.constexpr,
                      WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                      SPLITS: tl.constexpr = 1):
    """Programs over (N tiles, M tiles, parts of the words when SPLITS > 1); k_per_split counts words."""
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = ns < N, ms < M
    t = tl.arange(0, WORDS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    lo, hi = 0, K // 8
    if SPLITS > 1:
        lo = tl.program_id(2) * k_per_split
        hi = tl.minimum(lo + k_per_split, K // 8)
    for word0 in range(lo, hi, WORDS):
        words = tl.load(w_ptr + ns[:, None] * stride_wn + (tl.multiple_of(word0, WORDS) + t)[None, :],
                        mask=n_mask[:, None], other=0)
        first = (word0 // SLICE) * 8 * SLICE + word0 % SLICE  # the run's first column of these words
        for j in tl.static_range(8):
            col = first + j * SLICE
            s = tl.load(s_ptr + ns * stride_sn + col // GROUP, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + ns * stride_sn + col // GROUP, mask=n_mask, other=0).to(tl.float32)
            # the nibble under 2^23's exponent, less 2^23 + 8 + zero in one exact subtraction
            bits = ((words >> (4 * j)) & 0xF) | 0x4B000000
            w = (bits.to(tl.float32, bitcast=True) - (8388616.0 + z)[:, None]) * s[:, None]
            xt = tl.load(x_ptr + ms[None, :] * stride_xm + (tl.multiple_of(col, WORDS) + t)[:, None],
                         mask=m_mask[None, :], other=0.0)
            acc += tl.dot(w.to(xt.dtype), xt, input_precision=PRECISION)
    mask = n_mask[:, None] & m_mask[None, :]
    if SPLITS > 1:
        count, acc = add_parts(acc, part_ptr + ms[None, :] * N + ns[:, None], mask,
                               counter_ptr + pid_m * tl.num_programs(0) + pid_n, M * N, tl.program_id(2), SPLITS)
        if count != SPLITS - 1:
            return
    tl.store(y_ptr + ms[None, :] * stride_ym + ns[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              slice_width: int, block_n: int = 128, block_m: int | None = None, words: int = 16,
              num_warps: int = 8, num_stages: int = 3, min_programs: int = 0) -> torch.Tensor:
    """x [M, K] @ the 4-bit weight (words interleaved in slices [N, K / 8], scales and zero points
    [N, K / group], one group a slice)^T -> [M, N] in x's dtype. min_programs: split K too where the
    output tiles are fewer (0: never)."""
    m, k = x.shape
    n = packed.shape[0]
    block_m = block_m or max(16, min(128, triton.next_power_of_2(m)))
    if packed.shape[1] * 8 != k or slice_width % words or words < 16 or group % slice_width:
        raise ValueError(f"int4 gemm: x {tuple(x.shape)}, packed {tuple(packed.shape)}, slices of {slice_width} and "
                         f"runs of {words} words (16 at least, within a slice) do not fit")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    parts, split = split_launch(grid[0] * grid[1], words, k // 8, m, n, min_programs, y)
    _int4_gemm_kernel[grid + (parts,)](
        x, packed, scales.contiguous(), zeros.contiguous(), y, m, n, k, x.stride(0), packed.stride(0),
        scales.stride(0), y.stride(0), GROUP=group, SLICE=slice_width, WORDS=words, BLOCK_N=block_n,
        BLOCK_M=block_m, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages, **split)
    return y
