"""The element-wise kernels before a W8A8 matmul, writing its 8-bit input and per-row scales directly:
RMSNorm (with the residual add before it) and SiLU-and-mul. Unfused, each wrote a 16-bit row that
ops/quantize.py then read back: a 16,000-token chunk's MLP wrote and reread 390 MB that way per layer.
The rows are the ones the unfused kernels store, rounded to the activation dtype, and they are quantized
by ops/quantize.py's arithmetic, so the 8-bit values and scales are the same bits as the two launches'
(tests/test_quantize_fused.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.activation import silu_and_mul_row
from sageinfer.ops.quantize import _quantized, kernel_rounds_by_hand, quantized_rows_out, row_launch, row_scale
from sageinfer.ops.rms_norm import norm_launch, normed_row


@triton.jit
def _store_quantized(q_row, cols, n, y, scale, inv_scale, INT8: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """y's values at these columns of a row of n, quantized with the row's scale, stored at q_row."""
    q = _quantized(y, scale, inv_scale, INT8, ROUND_BY_HAND)
    tl.store(q_row + cols, q.to(q_row.dtype.element_ty), mask=cols < n)


@triton.jit
def _rms_norm_quantize_kernel(x_ptr, residual_ptr, weight_ptr, q_ptr, scale_ptr, residual_out_ptr, stride_x,
                              stride_r, stride_q, hidden, eps, half_range, HAS_RESIDUAL: tl.constexpr,
                              INT8: tl.constexpr, BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr,
                              USE_PDL: tl.constexpr):
    launch.wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # ops/rms_norm.py's row, in the activation dtype, then quantized
    y = normed_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, stride_x, stride_r, hidden, eps,
                   HAS_RESIDUAL, BLOCK).to(tl.float32)
    scale = row_scale(tl.max(tl.abs(y), axis=0), half_range)
    tl.store(scale_ptr + row, scale)
    _store_quantized(q_ptr + row * stride_q, cols, hidden, y, scale, tl.math.div_rn(1.0, scale), INT8, ROUND_BY_HAND)


@triton.jit
def _silu_and_mul_block(x_row, cols, d, amax):
    """silu(gate) * up for these columns of a row (fp32), and amax raised to their largest magnitude."""
    y = silu_and_mul_row(x_row, cols, cols < d, d).to(tl.float32)
    return y, tl.maximum(amax, tl.max(tl.abs(y), axis=0))


@triton.jit
def _silu_and_mul_quantize_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, d, half_range,
                                  INT8: tl.constexpr, BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr,
                                  THIRDS: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if WHOLE_ROW:  # the row in registers, [gate, up] read once: one block, or three (THIRDS)
        cols = tl.arange(0, BLOCK)
        y0, amax = _silu_and_mul_block(x_row, cols, d, 0.0)
        if THIRDS:
            y1, amax = _silu_and_mul_block(x_row, cols + BLOCK, d, amax)
            y2, amax = _silu_and_mul_block(x_row, cols + 2 * BLOCK, d, amax)
        scale = row_scale(amax, half_range)
        tl.store(scale_ptr + row, scale)
        inv_scale = tl.math.div_rn(1.0, scale)
        _store_quantized(q_row, cols, d, y0, scale, inv_scale, INT8, ROUND_BY_HAND)
        if THIRDS:
            _store_quantized(q_row, cols + BLOCK, d, y1, scale, inv_scale, INT8, ROUND_BY_HAND)
            _store_quantized(q_row, cols + 2 * BLOCK, d, y2, scale, inv_scale, INT8, ROUND_BY_HAND)
    else:  # a wide row: its absmax, then its values recomputed (its [gate, up] still in the cache)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(silu_and_mul_row(x_row, cols, cols < d, d).to(tl.float32)))
        scale = row_scale(tl.max(amax, axis=0), half_range)
        tl.store(scale_ptr + row, scale)
        inv_scale = tl.math.div_rn(1.0, scale)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            y = silu_and_mul_row(x_row, cols, cols < d, d).to(tl.float32)
            _store_quantized(q_row, cols, d, y, scale, inv_scale, INT8, ROUND_BY_HAND)


def silu_launch(d: int) -> dict:
    """ops/quantize.row_launch for SiLU-and-mul's d columns a row, a whole row taken as three blocks of a quarter
    of its power of two where they cover it: lanes past d are masked but still execute, and the kernel is bound
    by its instructions. Qwen3-8B's 12,288 as 3 x 4,096 rather than 16,384 (a quarter of the lanes idle): on an
    H200, 418 -> 314 us at 16,384 rows, 13.4 -> 10.4 at 492 (benchmarks/experiments/time_row_kernels.py,
    2026-12-04g)."""
    cfg = row_launch(d)
    thirds = cfg["WHOLE_ROW"] and cfg["BLOCK"] >= 4 and 4 * d <= 3 * cfg["BLOCK"]
    return {**cfg, "BLOCK": cfg["BLOCK"] // 4 if thirds else cfg["BLOCK"], "THIRDS": thirds}


def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, scheme: str, half_range: float,
                      residual: torch.Tensor | None = None, rows_out: int | None = None):
    """RMSNorm of x [rows, hidden] (after adding residual) quantized per row: (8-bit rows, fp32 scales
    [rows, 1], x + residual or None without residual). rows_out: the 8-bit outputs' rows, if more
    (ops/quantize.quantized_rows_out)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    q, scale = quantized_rows_out(rows, hidden, scheme, x.device, rows_out)
    new_residual = None
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        new_residual = torch.empty_like(r2)
        assert r2.stride(0) == new_residual.stride(0)
    if rows == 0:
        return q, scale, new_residual
    r_in, r_out = (r2, new_residual) if residual is not None else (x2, x2)
    _rms_norm_quantize_kernel[(rows,)](x2, r_in, weight, q, scale, r_out, x2.stride(0), r_in.stride(0), q.stride(0),
                                       hidden, eps, float(half_range), HAS_RESIDUAL=residual is not None,
                                       INT8=scheme == "int8", ROUND_BY_HAND=kernel_rounds_by_hand(),
                                       **norm_launch(hidden), **launch.dependent_launch_kwargs())
    return q, scale, None if new_residual is None else new_residual.view(residual.shape)


def silu_and_mul_quantize(x: torch.Tensor, scheme: str, half_range: float,
                          rows_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up of x [rows, 2 * d] quantized per row: (8-bit [rows, d], fp32 scales [rows, 1]).
    rows_out: the outputs' rows, if more (ops/quantize.quantized_rows_out)."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    rows = x2.shape[0]
    q, scale = quantized_rows_out(rows, d, scheme, x.device, rows_out)
    if rows:
        _silu_and_mul_quantize_kernel[(rows,)](x2, q, scale, x2.stride(0), q.stride(0), d, float(half_range),
                                               INT8=scheme == "int8", ROUND_BY_HAND=kernel_rounds_by_hand(),
                                               **silu_launch(d))
    return q, scale
