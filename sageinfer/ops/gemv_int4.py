"""Skinny matmul of 4-bit weights for decode of a few sequences: ops/gemv.py's contract (up to
MAX_ROWS rows, the gated input, the folded RMSNorm, the residual add) over ops/weight_only.py's
words interleaved in slices of S columns.

Each program owns BLOCK_N output features and walks K a run of 8 S columns at a time: it loads the
run's [BLOCK_N, S] words once (the next run's are requested before this one is used), and for each
of the eight nibbles takes one shift and a float trick to get S consecutive columns, multiplies
them by their group's scale less the zero point, and accumulates x * w element-wise; one reduction
at the end. No int-to-float conversion, no regrouping of registers: at one row that is what held
the plain layout's kernel to a fifth of the memory's rate.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.weight_only import nibbles_as_float

# The best of 20 tried on an H200 at Qwen3-8B shapes, one row, each layer with its decode-step fusions
# (benchmarks/experiments/tune_int4_gemv.py; 5.0 ms for 36 layers' four matmuls against 5.5 for bf16
# weights through ops/gemv.py). block_n is for one row: more rows take fewer output features per
# program, so that the [rows, block_n, slice] accumulator stays in registers.
INT4_GEMV_CONFIG = {"block_n": 32, "num_warps": 8, "num_stages": 2}


@triton.jit
def _x_slice(x_ptr, ms3, ks3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED: tl.constexpr, PRENORM: tl.constexpr):
    """Input columns ks3 [1, 1, S] of rows ms3 [BLOCK_M, 1, 1] as fp32, formed as ops/gemv.py forms
    them: silu(gate) * up for a gated input, the RMS-normalised row scaled by norm_w with PRENORM."""
    offs = ms3 * stride_xm + ks3
    if GATED:
        gate = tl.load(x_ptr + offs, mask=m_mask3, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + offs, mask=m_mask3, other=0.0)
        return ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m_mask3, other=0.0)
    if PRENORM:
        norm_w = tl.load(norm_w_ptr + ks3)
        return ((x.to(tl.float32) * rstd3).to(x.dtype) * norm_w).to(tl.float32)
    return x.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                      stride_ym, stride_sn, eps, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                      PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr):
    # Every tensor is made in the accumulator's 3-D shape [rows of x, output features, slice] from
    # its pointers, so no value changes layout inside the loop.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows3 = rows[None, :, None].to(tl.int64)
    row_mask3 = row_mask[None, :, None]
    ms = tl.arange(0, BLOCK_M)
    ms3 = ms[:, None, None]
    m_mask3 = ms3 < M
    ws3 = tl.arange(0, SLICE)[None, None, :]
    w_rows = w_ptr + rows3 * stride_wn
    RUN: tl.constexpr = 8 * SLICE
    # The first run's words (no kernel writes weights) are requested before waiting for x's producer.
    words = tl.load(w_rows + ws3, mask=row_mask3, other=0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd3 = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
    if PRENORM:
        sum_sq = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
        for k0 in range(0, K, RUN):  # wide chunks: few round trips
            kr = k0 + tl.arange(0, RUN)[None, None, :]
            xr = tl.load(x_ptr + ms3 * stride_xm + kr, mask=m_mask3, other=0.0).to(tl.float32)
            sum_sq += tl.sum(xr * xr, 2, keep_dims=True)
        rstd3 = 1.0 / tl.sqrt(sum_sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N, SLICE), dtype=tl.float32)
    for k0 in range(0, K, RUN):
        run_words = words
        # K is a whole number of runs: the next run's words, if any, in flight while this one is used.
        next_words = k0 // 8 + SLICE + ws3
        words = tl.load(w_rows + next_words, mask=row_mask3 & (next_words < K // 8), other=0)
        for j in tl.static_range(8):
            x = _x_slice(x_ptr, ms3, k0 + j * SLICE + ws3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED, PRENORM)
            group = (k0 + j * SLICE) // GROUP
            s = tl.load(scale_ptr + rows3 * stride_sn + group, mask=row_mask3, other=0.0).to(tl.float32)
            offset = 8.0
            if HAS_ZERO:
                offset += tl.load(zero_ptr + rows3 * stride_sn + group, mask=row_mask3, other=0).to(tl.float32)
            acc += x * (nibbles_as_float(run_words, 4 * j) * s - offset * s)
    y_acc = tl.sum(acc, 2)
    if HAS_BIAS:
        y_acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    y_mask = (ms < M)[:, None] & row_mask[None, :]
    y = y_acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)  # rounded as the model's dtype rounds
    if ADD_TO_Y:  # residual + layer output, rounded as two tensors of the model's dtype add
        y = y + tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, y, mask=y_mask)


def int4_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None,
              group: int, slice_width: int, y: torch.Tensor, bias: torch.Tensor | None, gated: bool,
              norm_weight: torch.Tensor | None, eps: float, add_to_y: bool, config: dict | None) -> torch.Tensor:
    """Launched by ops.gemv.gemv, which has checked the shapes; writes (or adds to) y [M, N]."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1] * 8
    if slice_width < 2 or k % (8 * slice_width) or group % slice_width:
        raise ValueError(f"gemv: 4-bit words interleaved in slices of {slice_width} do not tile {k} input features "
                         f"in groups of {group}")
    block_m = max(1, triton.next_power_of_2(m))
    cfg = config or dict(INT4_GEMV_CONFIG, block_n=max(4, INT4_GEMV_CONFIG["block_n"] // block_m))
    _int4_gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, weight_scale, weight_zero if weight_zero is not None else weight_scale,
        bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), eps,
        GROUP=group, SLICE=slice_width, HAS_ZERO=weight_zero is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=cfg["block_n"], GATED=gated,
        PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
