"""RMSNorm, optionally fused with the residual add that precedes it (one read, two writes)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch


@triton.jit
def normed_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, stride_x, stride_r, hidden, eps,
               HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row's RMSNorm in the activation dtype, over columns arange(BLOCK) (those past hidden are 0); with
    the residual added first, and that sum stored."""
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    # Normalise in fp32, round to the input dtype, then scale: as transformers does.
    return ((xf * rstd).to(x.dtype) * w).to(x.dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_r, stride_o,
                     hidden, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    launch.wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    y = normed_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, stride_x, stride_r, hidden, eps,
                   HAS_RESIDUAL, BLOCK)
    cols = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * stride_o + cols, y, mask=cols < hidden)


def norm_launch(hidden: int) -> dict:
    """Block and warps of a kernel that normalises one row of hidden values a program."""
    block = triton.next_power_of_2(hidden)
    return {"BLOCK": block, "num_warps": min(16, max(1, block // 256))}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) or, with residual, (norm(x + residual), x + residual). x: [rows, hidden]."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x2)
    if residual is None:
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), hidden, eps,
                                         HAS_RESIDUAL=False, **norm_launch(hidden), **launch.dependent_launch_kwargs())
        return out.view(x.shape)
    r2 = residual.reshape(-1, hidden)
    new_residual = torch.empty_like(r2)
    assert r2.stride(0) == new_residual.stride(0)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, new_residual, x2.stride(0), r2.stride(0), out.stride(0),
                                     hidden, eps, HAS_RESIDUAL=True, **norm_launch(hidden),
                                     **launch.dependent_launch_kwargs())
    return out.view(x.shape), new_residual.view(x.shape)
