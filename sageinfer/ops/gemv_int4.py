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
from sageinfer.ops.gemv import _normed, _x_chunk
from sageinfer.ops.weight_only import nibbles_as_float

# Tuned on an H200 at Qwen3-8B shapes, one row (benchmarks/experiments/tune_int4_gemv.py).
INT4_GEMV_CONFIG = {"block_n": 4, "num_warps": 4, "num_stages": 1}


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                      stride_ym, stride_sn, eps, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                      PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    scale_rows = scale_ptr + rows.to(tl.int64) * stride_sn
    zero_rows = zero_ptr + rows.to(tl.int64) * stride_sn  # zero points share the scales' layout
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    ws = tl.arange(0, SLICE)
    RUN: tl.constexpr = 8 * SLICE
    # The first run's words (no kernel writes weights) are requested before waiting for x's producer.
    words = tl.load(w_rows + ws[None, :], mask=row_mask[:, None], other=0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PRENORM:
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, RUN):
            kr = k0 + tl.arange(0, RUN)
            xr = tl.load(x_ptr + ms[:, None] * stride_xm + kr[None, :], mask=m_mask[:, None], other=0.0)
            xr = xr.to(tl.float32)
            sum_sq += tl.sum(xr * xr, 1)
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N, SLICE), dtype=tl.float32)
    for k0 in range(0, K, RUN):
        run_words = words
        # K is a whole number of runs: the next run's words, if any, in flight while this one is used.
        next_words = k0 // 8 + SLICE + ws
        words = tl.load(w_rows + next_words[None, :], mask=row_mask[:, None] & (next_words < K // 8)[None, :],
                        other=0)
        for j in tl.static_range(8):
            ks = k0 + j * SLICE + ws
            x = _x_chunk(x_ptr, ms, ks, m_mask[:, None], stride_xm, K, GATED)
            if PRENORM:
                x = _normed(x, rstd, norm_w_ptr, ks, K, x_ptr.dtype.element_ty)
            group = (k0 + j * SLICE) // GROUP
            s = tl.load(scale_rows + group, mask=row_mask, other=0.0).to(tl.float32)
            offset = 8.0
            if HAS_ZERO:
                offset += tl.load(zero_rows + group, mask=row_mask, other=0).to(tl.float32)
            w = nibbles_as_float(run_words, 4 * j) * s[:, None] - (offset * s)[:, None]
            acc += x[:, None, :] * w[None, :, :]
    y_acc = tl.sum(acc, 2)
    if HAS_BIAS:
        y_acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    y_mask = m_mask[:, None] & row_mask[None, :]
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
    cfg = config or INT4_GEMV_CONFIG
    _int4_gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, weight_scale, weight_zero if weight_zero is not None else weight_scale,
        bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), eps,
        GROUP=group, SLICE=slice_width, HAS_ZERO=weight_zero is not None, HAS_BIAS=bias is not None,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=cfg["block_n"], GATED=gated,
        PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
