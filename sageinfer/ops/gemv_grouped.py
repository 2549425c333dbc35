"""Skinny matmul of 8-bit weights (FP8 e4m3 or INT8) with a scale per row and group of input features
(block-quantized FP8 as Qwen3's and DeepSeek's FP8 releases hold it, W8A16 checkpoints): ops/gemv.py's
contract (up to MAX_ROWS rows, the gated input, the folded RMSNorm, the residual add, the activation
out).

Every tensor is made in one 4-D shape from its pointers, [rows of x, output features, groups, group],
so no value changes layout in the loop: a program walks K GROUPS groups at a time (enough bytes in
flight per program), sums each thread's four consecutive products and applies their group's scale once
per four weights; one reduction at the end. (Scaling each [rows, 2048] chunk after reshaping it to its
groups, a layout change through shared memory on every chunk, was slower: on an H200, block FP8's L1
TPOT 6.07 ms that way, 4.82 ms this way; W8A16 5.62 -> 5.15 ms;
benchmarks/results/2026-12-03-h200-8bit-group-one-row.md.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.gemv import finish_rows, fused_input, program_tile_3d, quarters, weights_f32

# benchmarks/experiments/time_8bit_step.py's sweep on an H200 (a one-row step's 144 matmuls, FP8, groups of
# 128): 4.05-4.21 ms for 8-16 rows and 4-8 groups a program at 4 warps, 4.5-16 ms elsewhere; end to end
# (L1 TPOT) 8 rows and 8 groups came out ahead of 8 and 4 (block FP8 4.82 / 4.91 ms, W8A16 5.15 / 5.22).
# A trip covers `columns` inputs whatever the group: NVFP4's groups of 16, 8 a trip (128 columns), took
# 9.40 ms (L1 TPOT); at 1,024 columns a trip it is not yet timed.
GROUPED_GEMV_CONFIG = {"block_n": 8, "columns": 1024, "num_warps": 4, "num_stages": 2}


@triton.jit(do_not_specialize=["M"])
def _grouped_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                         stride_ym, stride_sn, eps, GROUP: tl.constexpr, GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr, PRENORM: tl.constexpr,
                         ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr, ACTIVATE: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_mask, rows3, row_mask3, ms, ms3, m_mask3 = program_tile_3d(pid, M, N, BLOCK_M, BLOCK_N, ACTIVATE)
    rows4, row_mask4, ms4, m_mask4 = rows3[:, :, :, None], row_mask3[:, :, :, None], ms3[:, :, :, None], \
        m_mask3[:, :, :, None]
    gs4 = tl.arange(0, GROUPS)[None, None, :, None]
    cs4 = gs4 * GROUP + tl.arange(0, GROUP)[None, None, None, :]  # a chunk's columns, group by group
    CHUNK: tl.constexpr = GROUPS * GROUP
    w_rows = w_ptr + rows4 * stride_wn
    scale_rows = scale_ptr + rows4 * stride_sn
    # The first chunk's weights (no kernel writes weights) are requested before waiting for x's producer.
    w = tl.load(w_rows + cs4, mask=row_mask4, other=0.0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd4 = tl.zeros((BLOCK_M, 1, 1, 1), dtype=tl.float32)
    if PRENORM:
        sum_sq = tl.zeros((BLOCK_M, 1, 1, 1), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            kr = k0 + cs4
            xr = tl.load(x_ptr + ms4 * stride_xm + kr, mask=m_mask4, other=0.0).to(tl.float32)
            sum_sq += tl.sum(tl.sum(xr * xr, 3, keep_dims=True), 2, keep_dims=True)
        rstd4 = 1.0 / tl.sqrt(sum_sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N, GROUPS, GROUP // 4), dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        current = w
        # K is a whole number of chunks: the next chunk's weights, if any, in flight while these are used.
        w = tl.load(w_rows + (k0 + CHUNK) + cs4, mask=row_mask4 & (k0 + CHUNK + cs4 < K), other=0.0)
        x = fused_input(x_ptr, ms4, k0 + cs4, m_mask4, stride_xm, K, rstd4, norm_w_ptr, GATED, PRENORM)
        s = tl.load(scale_rows + (k0 // GROUP + gs4), mask=row_mask4, other=0.0).to(tl.float32)
        q0, q1, q2, q3 = quarters(x * weights_f32(current))
        acc += ((q0 + q1) + (q2 + q3)) * s
    finish_rows(tl.sum(tl.sum(acc, 3), 2), x_ptr, bias_ptr, y_ptr, ms, ms < M, rows, row_mask, stride_ym, pid, N,
                HAS_BIAS, ACTIVATE, ADD_TO_Y, BLOCK_M, BLOCK_N)


def grouped_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group: int, y: torch.Tensor,
                 bias: torch.Tensor | None, gated: bool, norm_weight: torch.Tensor | None, eps: float,
                 add_to_y: bool, activate: bool, config: dict | None = None) -> torch.Tensor:
    """Launched by ops.gemv.gemv, which has checked the shapes; group: a power of two of at least 16
    dividing K."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    block_m = max(1, triton.next_power_of_2(m))
    cfg = {**GROUPED_GEMV_CONFIG, "block_n": max(2, GROUPED_GEMV_CONFIG["block_n"] // block_m), **(config or {})}
    # chunks of a power of two of groups dividing K
    groups = min(max(1, cfg["columns"] // group), (k // group) & -(k // group))
    _grouped_gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, weight_scale, bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), eps, GROUP=group, GROUPS=groups,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], GATED=gated,
        PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y, ACTIVATE=activate, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
