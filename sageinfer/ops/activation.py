"""silu(gate) * up over a [rows, 2 * d] input, one pass."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def silu_and_mul_row(x_row, cols, mask, d):
    """silu(gate) * up for these columns of a row whose [gate, up] starts at x_row, in the input dtype."""
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (silu * up).to(up.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    tl.store(out_ptr + row * stride_o + cols, silu_and_mul_row(x_ptr + row * stride_x, cols, mask, d), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0), d, BLOCK=block)
    return out.view(*x.shape[:-1], d)
