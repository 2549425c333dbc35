"""Activations to 8 bits (FP8 e4m3 or INT8) with a scale per row, in one kernel.

The same arithmetic as the torch reference in `layers/quantization/w8a8.py` (absmax / half range,
x / scale, clamp), done in one launch instead of the six or seven elementwise and reduction kernels
that the torch version costs: in a W8A8 layer those took as long as the 8-bit GEMM itself. Division
and rounding are IEEE and done before the cast (half to even, as torch), so every backend stores the
values the reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@triton.jit
def _round_to_e4m3(y):
    """y (fp32, |y| <= 448) rounded to nearest even on the e4m3 grid, so that the cast to FP8 is exact
    whatever rounding a backend's conversion does (the Triton interpreter's does not carry into the
    exponent). Normal range: keep 3 mantissa bits; below 2**-6 the subnormal step is 2**-9."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = (y + 24576.0) - 24576.0  # 24576 = 1.5 * 2**14 has a step of 2**-9
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _quantized(y, scale, INT8: tl.constexpr):
    """fp32 values over their row's scale, rounded and clamped: still fp32, but on the 8-bit grid, so the
    store's conversion is exact (one return type for both schemes, as Triton's compiler needs)."""
    # IEEE division, as torch: the default one is approximate on NVIDIA and moves rounding ties
    y = tl.math.div_rn(y, scale)
    if INT8:
        y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds to an integer, half to even
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    else:
        y = _round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    return y


@triton.jit
def row_scale(amax, half_range):
    """A row's scale from its largest magnitude."""
    return tl.math.div_rn(tl.maximum(amax, 1e-12), half_range)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, k, stride_x, stride_q, half_range,
                          INT8: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if WHOLE_ROW:  # the row in registers: read once
        cols = tl.arange(0, BLOCK)
        mask = cols < k
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            scale = row_scale(tl.max(tl.abs(v), axis=0), half_range)
        tl.store(scale_ptr + row, scale)
        tl.store(q_row + cols, _quantized(v, scale, INT8).to(q_ptr.dtype.element_ty), mask=mask)
    else:  # a wide row: its absmax, then its values
        if STATIC:
            scale = tl.load(static_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, k, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                v = tl.load(x_row + cols, mask=cols < k, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = row_scale(tl.max(amax, axis=0), half_range)
        tl.store(scale_ptr + row, scale)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < k
            v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols, _quantized(v, scale, INT8).to(q_ptr.dtype.element_ty), mask=mask)


# A batch of up to WHOLE_ROW_MAX_ROWS rows, each up to WHOLE_ROW_MAX wide, is held in registers (16 warps:
# 32 values a thread) and read once; more rows go in blocks of 2,048 with 4 warps, two passes, the second
# from the cache. H200s, bf16 to FP8, Qwen3-8B widths (benchmarks/experiments/time_fused_quantize.py: a
# layer's two norms and activation, fused; two machines, 2026-12-04d-h200-fused-quantize.md): whole rows
# 12.0 against 16.2 us at 64 rows and 18.5 against 20.2 at 200, but 32.1 against 30.6 at 492 and 807
# against 722 at 16,384 (programs of 16 warps: fewer of them an SM, fewer loads in flight).
WHOLE_ROW_MAX = 16384
WHOLE_ROW_MAX_ROWS = 256


def row_launch(k: int, rows: int) -> dict:
    """Block and warps of a per-row kernel over rows x k, and whether each row is read once."""
    whole = triton.next_power_of_2(k) <= WHOLE_ROW_MAX and rows <= WHOLE_ROW_MAX_ROWS
    block = triton.next_power_of_2(k) if whole else min(2048, triton.next_power_of_2(k))
    return {"BLOCK": block, "WHOLE_ROW": whole, "num_warps": max(4, min(16, block // 1024)) if whole else 4}


def quantized_rows_out(rows: int, k: int, scheme: str, device, rows_out: int | None = None):
    """The 8-bit rows and their fp32 scales to write `rows` rows into: (q [R, k], scale [R, 1]) with R
    the larger of rows and rows_out (a GEMM that is faster on a taller input; rows past `rows` are
    left unwritten, and their products are dropped)."""
    total = max(rows, rows_out or 0)
    return (torch.empty(total, k, dtype=_QDTYPE[scheme], device=device),
            torch.empty(total, 1, dtype=torch.float32, device=device))


def quantize_rows_kernel(x: torch.Tensor, scheme: str, half_range: float,
                         static_scale: torch.Tensor | None = None,
                         rows_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous) -> (8-bit x [M, K], fp32 scale [M, 1]). With static_scale (one
    element), every row takes that scale; otherwise each row's absmax / half_range. rows_out: the
    outputs' rows, if more than M (quantized_rows_out)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("quantize_rows_kernel takes a 2-D tensor with contiguous rows")
    m, k = x.shape
    q, scale = quantized_rows_out(m, k, scheme, x.device, rows_out)
    if m == 0:
        return q, scale
    static = static_scale if static_scale is not None else scale
    _quantize_rows_kernel[(m,)](x, q, scale, static, k, x.stride(0), q.stride(0), float(half_range),
                                INT8=scheme == "int8", STATIC=static_scale is not None, **row_launch(k, m))
    return q, scale
