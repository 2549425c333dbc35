"""INT8 x INT8 matmul with int32 accumulation and the scales applied in the epilogue, in Triton.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n]: the W8A8 layers' INT8 product for
chips where no library INT8 GEMM is at hand (INT8 is what the domestic accelerators share; on NVIDIA
and the CPU the layers keep torch._int_mm). The accumulation is exact, so it equals the library path
up to the float rounding of the scaling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles every Triton backend takes (int8 dots want K tiles of 32 or more on most chips).
CONFIG = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4}


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, y_ptr, x_scale_ptr, w_scale_ptr, m, n, k, stride_x, stride_w, stride_y,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < m, cols < n
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(0, k, BLOCK_K):
        k_ok = start + ks < k
        x = tl.load(x_rows + (start + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_cols + (start + ks)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
        acc += tl.dot(x, w)
    x_scale = tl.load(x_scale_ptr + rows, mask=row_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """xq [M, K] int8 with x_scale [M, 1] (or [M]); wq [N, K] int8 with w_scale [N]; rows contiguous.
    Returns [M, N] in out_dtype."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"int8_matmul takes int8 [M, K] and [N, K], got {xq.dtype} {tuple(xq.shape)} and "
                         f"{wq.dtype} {tuple(wq.shape)}")
    if xq.stride(-1) != 1 or wq.stride(-1) != 1:
        raise ValueError("int8_matmul takes operands with contiguous rows")
    cfg = {**CONFIG, **(config or {})}
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    x_scale = x_scale.reshape(-1).float().contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]))
    _int8_matmul_kernel[grid](xq, wq, y, x_scale, w_scale, m, n, k, xq.stride(0), wq.stride(0), y.stride(0),
                              BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                              num_warps=cfg["num_warps"])
    return y
