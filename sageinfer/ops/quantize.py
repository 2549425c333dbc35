"""Activations to 8 bits (FP8 e4m3 or INT8) with a scale per row, in one kernel.

The same arithmetic as the torch reference in `layers/quantization/w8a8.py` (absmax / half range,
x / scale, clamp), done in one launch instead of the six or seven elementwise and reduction kernels
that the torch version costs: in a W8A8 layer those took as long as the 8-bit GEMM itself. The quotient
is IEEE's (rounded once, as torch divides) and the cast rounds half to even, as torch's, so every
backend stores the values the reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch

_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@triton.jit
def _round_to_e4m3(y):
    """y (fp32, |y| <= 448) rounded to nearest even on the e4m3 grid, so that the cast to FP8 is exact
    where a backend's conversion does not round (the Triton interpreter's does not carry into the
    exponent). Normal range: keep 3 mantissa bits; below 2**-6 the subnormal step is 2**-9, and a
    negative value that rounds to zero keeps its sign, as torch's cast does."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 0xFFF00000
    subnormal = (tl.abs(y) + 24576.0) - 24576.0  # 24576 = 1.5 * 2**14 has a step of 2**-9
    subnormal = tl.where(bits < 0, -subnormal, subnormal)  # the sign bit's, -0.0's too
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def quotient(y, scale, inv_scale):
    """y / scale rounded once, as IEEE division (and torch) gives it, from the row's inverse (inv_scale, itself
    rounded once): the product is within two ulps and two fma corrections on its exact remainder round it
    (Markstein). Five instructions an element against about twelve and a slow-path branch for a division: the
    per-row kernels were bound by their arithmetic, not by memory (benchmarks/experiments/time_row_kernels.py).
    A zero keeps its sign (FP8 stores it): its correction term is +0 times -inv_scale, -0, which leaves either
    zero as it is (the correction as rem * inv_scale + q would turn -0 into +0)."""
    q = y * inv_scale
    neg_inv_scale = -inv_scale
    q = tl.fma(tl.fma(q, scale, -y), neg_inv_scale, q)
    q = tl.fma(tl.fma(q, scale, -y), neg_inv_scale, q)
    return q


@triton.jit
def _quantized(y, scale, inv_scale, INT8: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """fp32 values over their row's scale, rounded and clamped: still fp32, but on the 8-bit grid, so the
    store's conversion is exact (one return type for both schemes, as Triton's compiler needs). FP8 values
    are left to the store's cast (round half to even, on sm_89+ one instruction a pair) unless
    ROUND_BY_HAND (kernel_rounds_by_hand)."""
    y = quotient(y, scale, inv_scale)
    if INT8:
        y = (y + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds to an integer, half to even
        y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    else:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if ROUND_BY_HAND:
            y = _round_to_e4m3(y)
    return y


def kernel_rounds_by_hand() -> bool:
    """Whether the kernels round FP8 values themselves before the cast: under the Triton interpreter, whose
    conversion truncates. Elsewhere the cast rounds, in one instruction a pair on an H200, as torch's does
    (checked there over every magnitude by benchmarks/experiments/time_row_kernels.py; the bit-for-bit
    tests check it on any backend that runs them)."""
    return launch.interpreting()


@triton.jit
def row_scale(amax, half_range):
    """A row's scale from its largest magnitude."""
    return tl.math.div_rn(tl.maximum(amax, 1e-12), half_range)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, k, stride_x, stride_q, half_range,
                          INT8: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr,
                          ROUND_BY_HAND: tl.constexpr):
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
        q = _quantized(v, scale, tl.math.div_rn(1.0, scale), INT8, ROUND_BY_HAND)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
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
        inv_scale = tl.math.div_rn(1.0, scale)
        for start in range(0, k, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < k
            v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            q = _quantized(v, scale, inv_scale, INT8, ROUND_BY_HAND)
            tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


# A row of up to WHOLE_ROW_MAX values is held in registers (up to 16 warps: 32 values a thread) and read
# once; a wider one goes in blocks of 2,048 with 4 warps, two passes, the second from the cache. H200,
# bf16 to FP8, Qwen3-8B widths, us a launch (benchmarks/experiments/time_row_kernels.py, 2026-12-04f):
# SiLU-and-mul over 12,288 columns, whole rows against blocks: 11.7 / 15.3 at 492 rows, 44.9 / 61.6 at
# 2,048, 325 / 420 at 16,384. (Whole rows lost at large batches only while each element paid an IEEE
# division: 581 against 478 us at 16,384.)
WHOLE_ROW_MAX = 16384


def row_launch(k: int) -> dict:
    """Block and warps of a per-row kernel over rows x k, and whether each row is read once."""
    whole = triton.next_power_of_2(k) <= WHOLE_ROW_MAX
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
                                INT8=scheme == "int8", STATIC=static_scale is not None,
                                ROUND_BY_HAND=kernel_rounds_by_hand(), **row_launch(k))
    return q, scale
