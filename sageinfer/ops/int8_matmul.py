"""INT8 x INT8 matmul with int32 accumulation and the scales applied in the epilogue, in Triton.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n]: the W8A8 layers' INT8 product where the
platform prefers it to its library's (Hopper: torch._int_mm runs an sm_80 kernel and leaves an int32
product that three more passes scale and round) or has no library INT8 GEMM at all (INT8 is what the
domestic accelerators share). The accumulation is exact, so it equals the library path up to the float
rounding of the scaling.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (Triton 3.3 on); a vendor's older Triton has none: no bulk copies there
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# Tiles every Triton backend takes (int8 dots want K tiles of 32 or more on most chips).
CONFIG = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 4}  # pipeline stages: the backend's default
# Tiles by row count where the platform runs this kernel for speed (Hopper's warpgroup MMA on int8): few
# rows are bound by reading the weights (narrow column tiles so that the programs fill the processors),
# many by the tensor cores (wide tiles). Three kinds, so three compiles (the row count is not specialised).
# A Qwen3-8B layer's four matmuls on an H200 (benchmarks/experiments/time_int8_gemm.py), ms against
# torch._int_mm with the scales after it: 32 rows 0.085 against 0.117, 256 rows 0.139 against 0.293, 2048
# rows 0.595 against 1.689, 16,000 rows 5.39 against 12.85 (1,146 INT8 TOP/s; 128 x 256 tiles 5.83).
MANY_ROWS = {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
# "persistent": the caller gives the launch one program a processor ("programs") for the descriptor kernel,
# where the platform has a tensor copy engine (its operands arrive by tensor copies, its output leaves by one).
# On an H200 its 128 x 256 tiles beat the pointer kernel's best at 16,000 rows, 4.97 against 5.25 ms a layer
# (1,241 INT8 TOP/s), and lose at 2,048, 0.64 against 0.60 (2026-12-05d). So they take batches past 8,192
# rows: INT8 W8A8 T1 on an H100 +4.2% and +3.7% in two runs of opposite order (2026-12-05e, 12-05f; a fourth
# compile at start-up). SAGEINFER_INT8_TMA=0 leaves every large batch to the pointer kernel.
INT8_TMA = os.environ.get("SAGEINFER_INT8_TMA", "1") != "0"
_DESCRIPTOR_ROWS = {"block_m": 128, "block_n": 256, "block_k": 128, "num_warps": 8, "num_stages": 3,
                    "persistent": True}
FAST_CONFIGS = (
    (64, {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}),
    (512, {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 4}),
    *(((8192, MANY_ROWS), (None, _DESCRIPTOR_ROWS)) if INT8_TMA else ((None, MANY_ROWS),)),
)
# Row tiles that share their column tiles run side by side, so a column tile of the weights is read from
# L2 by several row tiles instead of from memory by each.
GROUP_M = 8


def fast_config(m: int) -> dict:
    """The launch configuration of FAST_CONFIGS for m rows."""
    return next(cfg for rows, cfg in FAST_CONFIGS if rows is None or m <= rows)


@triton.jit
def grouped_tile(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The (row tile, column tile) of program pid when programs walk row tiles GROUP at a time down each
    column tile."""
    row_tiles, col_tiles = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
    per_group = GROUP * col_tiles
    first_row_tile = (pid // per_group) * GROUP
    group_rows = tl.minimum(row_tiles - first_row_tile, GROUP)
    return first_row_tile + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit(do_not_specialize=["m"])
def _int8_matmul_kernel(x_ptr, w_ptr, y_ptr, x_scale_ptr, w_scale_ptr, m, n, k, stride_x, stride_w, stride_y,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP: tl.constexpr):
    row_tile, col_tile = grouped_tile(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
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


@triton.jit(do_not_specialize=["m", "programs"])
def _int8_matmul_tma_kernel(x_desc, w_desc, y_desc, x_scale_ptr, w_scale_ptr, m, n, k, programs,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP: tl.constexpr):
    """The same product, tiles moved by the tensor copy engine (descriptors: no per-thread addresses, the
    edges of M, N and K zero-filled and clipped by the copies) and `programs` persistent programs walking
    the output tiles, so that one tile's epilogue overlaps the next tile's first loads."""
    tiles = tl.cdiv(m, BLOCK_M) * tl.cdiv(n, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, programs, flatten=True):
        row_tile, col_tile = grouped_tile(tile, m, n, BLOCK_M, BLOCK_N, GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for start in range(0, k, BLOCK_K):
            x = x_desc.load([row_tile * BLOCK_M, start])
            w = w_desc.load([col_tile * BLOCK_N, start])
            acc += tl.dot(x, w.T)
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        x_scale = tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < n, other=0.0)
        y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        y_desc.store([row_tile * BLOCK_M, col_tile * BLOCK_N], y.to(y_desc.dtype))


def tma_applies(xq: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the descriptor kernel can take these operands: a Triton with host descriptors, and rows whose
    byte strides are multiples of 16 (the copy engine's rule: K of the int8 operands, N of the output)."""
    return (TensorDescriptor is not None and xq.stride(0) % 16 == 0 and wq.stride(0) % 16 == 0
            and (wq.shape[0] * out_dtype.itemsize) % 16 == 0 and xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0)


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """xq [M, K] int8 with x_scale [M, 1] (or [M]); wq [N, K] int8 with w_scale [N]; rows contiguous.
    Returns [M, N] in out_dtype. config: the launch's tiles (CONFIG's keys; fast_config(M) for speed); with
    "programs": P, the descriptor kernel in P persistent programs where the operands allow it (tma_applies),
    else the pointer kernel."""
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
    stages = {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}
    tiles = triton.cdiv(m, cfg["block_m"]) * triton.cdiv(n, cfg["block_n"])
    if cfg.get("programs") and tma_applies(xq, wq, out_dtype):
        bm, bn, bk = cfg["block_m"], cfg["block_n"], cfg["block_k"]
        programs = min(cfg["programs"], tiles)
        _int8_matmul_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(xq, [bm, bk]), TensorDescriptor.from_tensor(wq, [bn, bk]),
            TensorDescriptor.from_tensor(y, [bm, bn]), x_scale, w_scale, m, n, k, programs,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, num_warps=cfg["num_warps"], **stages)
        return y
    grid = (tiles,)
    _int8_matmul_kernel[grid](xq, wq, y, x_scale, w_scale, m, n, k, xq.stride(0), wq.stride(0), y.stride(0),
                              BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP=GROUP_M,
                              num_warps=cfg["num_warps"], **stages)
    return y
