"""Skinny matmul of 8-bit weights (FP8 e4m3 or INT8) with a scale per row and group of input features
(block-quantized FP8 as Qwen3's and DeepSeek's FP8 releases hold it, W8A16 checkpoints): ops/gemv.py's
contract (up to MAX_ROWS rows, the gated input, the folded RMSNorm, the residual add, the activation
out).

ops/gemv.py scales such weights by reshaping each [rows, 2048] chunk into [rows, groups, group] to meet
its scales, a layout change through shared memory on every chunk. Here every tensor is made in one
3-D shape from its pointers, [rows of x, output features, group] as ops/gemv_int4.py does, so no value
changes layout in the loop: a program walks K one group at a time, sums each thread's four consecutive
products and applies the group's scale once per four weights; one reduction at the end.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.gemv import finish_rows, fused_input, program_tile_3d, quarters, weights_f32

# Off until timed on a GPU against ops/gemv.py's reshaping path (sm_90 loops counted by
# benchmarks/experiments/sass_loop.py gemv --weights fp8 --group 128, with SAGEINFER_GROUPED_GEMV=1);
# block FP8's one-row decode measured L1 TPOT 5.96 ms on an H200, against 3.82 ms for per-channel FP8.
GROUPED_GEMV = os.environ.get("SAGEINFER_GROUPED_GEMV", "0") != "0"
GROUPED_GEMV_CONFIG = {"block_n": 32, "num_warps": 4, "num_stages": 2}


@triton.jit(do_not_specialize=["M"])
def _grouped_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                         stride_ym, stride_sn, eps, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr, PRENORM: tl.constexpr,
                         ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr, ACTIVATE: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_mask, rows3, row_mask3, ms, ms3, m_mask3 = program_tile_3d(pid, M, N, BLOCK_M, BLOCK_N, ACTIVATE)
    cs3 = tl.arange(0, GROUP)[None, None, :]
    w_rows = w_ptr + rows3 * stride_wn
    scale_rows = scale_ptr + rows3 * stride_sn
    # The first group's weights (no kernel writes weights) are requested before waiting for x's producer.
    w = tl.load(w_rows + cs3, mask=row_mask3, other=0.0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd3 = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
    if PRENORM:
        CHUNK: tl.constexpr = 8 * GROUP
        sum_sq = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            kr = k0 + tl.arange(0, CHUNK)[None, None, :]
            xr = tl.load(x_ptr + ms3 * stride_xm + kr, mask=m_mask3 & (kr < K), other=0.0).to(tl.float32)
            sum_sq += tl.sum(xr * xr, 2, keep_dims=True)
        rstd3 = 1.0 / tl.sqrt(sum_sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N, GROUP // 4), dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        current = w
        # K is a whole number of groups: the next group's weights, if any, in flight while these are used.
        w = tl.load(w_rows + (k0 + GROUP) + cs3, mask=row_mask3 & (k0 + GROUP + cs3 < K), other=0.0)
        x = fused_input(x_ptr, ms3, k0 + cs3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED, PRENORM)
        s = tl.load(scale_rows + k0 // GROUP, mask=row_mask3, other=0.0).to(tl.float32)
        q0, q1, q2, q3 = quarters(x * weights_f32(current))
        acc += ((q0 + q1) + (q2 + q3)) * s
    finish_rows(tl.sum(acc, 2), x_ptr, bias_ptr, y_ptr, ms, ms < M, rows, row_mask, stride_ym, pid, N, HAS_BIAS,
                ACTIVATE, ADD_TO_Y, BLOCK_M, BLOCK_N)


def grouped_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group: int, y: torch.Tensor,
                 bias: torch.Tensor | None, gated: bool, norm_weight: torch.Tensor | None, eps: float,
                 add_to_y: bool, activate: bool, config: dict | None = None) -> torch.Tensor:
    """Launched by ops.gemv.gemv, which has checked the shapes; group: a power of two of at least 16
    dividing K (callers take ops/gemv.py's path otherwise)."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    block_m = max(1, triton.next_power_of_2(m))
    cfg = config or dict(GROUPED_GEMV_CONFIG, block_n=max(4, GROUPED_GEMV_CONFIG["block_n"] // block_m))
    _grouped_gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, weight_scale, bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), eps, GROUP=group,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], GATED=gated,
        PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y, ACTIVATE=activate, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
