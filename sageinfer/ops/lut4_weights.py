"""4-bit weights that index a table of 16 values (bitsandbytes' NF4 and FP4): codes two a byte along the
input (the first in the high nibble, as bitsandbytes packs them), [out, in / 2] uint8, each block of
`block` inputs of a row scaled by its absmax, [out, in / block] float32: w = table[code] * absmax.

The table's values are not evenly spaced, so the affine 4-bit kernels (ops/gemv_int4.py) cannot run them: up
to a few rows ops/gemv_lut4.py reads the codes as they are; above, a layer expands its weight in one Triton pass
(the table read from memory by code) for the library GEMM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_ROWS, _BLOCK_PAIRS = 16, 64


def check_lut4_layout(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int) -> None:
    n, half = codes.shape
    if codes.dtype != torch.uint8 or table.numel() != 16 or (2 * half) % block \
            or absmax.shape != (n, 2 * half // block):
        raise ValueError(f"4-bit table codes {tuple(codes.shape)} {codes.dtype}, absmax {tuple(absmax.shape)}, "
                         f"table of {table.numel()} and blocks of {block} do not fit")


def lut4_expand(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] in dtype (the reference, in torch)."""
    check_lut4_layout(codes, absmax, table, block)
    values = torch.stack((codes >> 4, codes & 0xF), -1).reshape(codes.shape[0], -1).long()
    return (table.float()[values] * absmax.float().repeat_interleave(block, 1)).to(dtype)


@triton.jit
def _lut4_expand_kernel(codes_ptr, absmax_ptr, table_ptr, out_ptr, n, half, stride_c, stride_a, stride_o,
                        BLOCK: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pairs = tl.program_id(1) * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    mask = (rows[:, None] < n) & (pairs[None, :] < half)
    byte = tl.load(codes_ptr + rows[:, None] * stride_c + pairs[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + rows[:, None] * stride_a + (2 * pairs[None, :]) // BLOCK, mask=mask, other=0.0)
    first = tl.load(table_ptr + (byte >> 4)) * scale  # (a block holds whole pairs: BLOCK is even)
    second = tl.load(table_ptr + (byte & 0xF)) * scale
    values = tl.join(first, second).reshape(BLOCK_ROWS, 2 * BLOCK_PAIRS)
    cols = tl.program_id(1) * 2 * BLOCK_PAIRS + tl.arange(0, 2 * BLOCK_PAIRS)
    out_mask = (rows[:, None] < n) & (cols[None, :] < 2 * half)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], values.to(out_ptr.dtype.element_ty), mask=out_mask)


def lut4_expand_kernel(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, block: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """`lut4_expand` in one Triton pass."""
    check_lut4_layout(codes, absmax, table, block)
    n, half = codes.shape
    out = torch.empty(n, 2 * half, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(n, _BLOCK_ROWS), triton.cdiv(half, _BLOCK_PAIRS))
    _lut4_expand_kernel[grid](codes, absmax, table, out, n, half, codes.stride(0), absmax.stride(0), out.stride(0),
                              BLOCK=block, BLOCK_ROWS=_BLOCK_ROWS, BLOCK_PAIRS=_BLOCK_PAIRS)
    return out


def lut4_quantize(weight: torch.Tensor, table: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-precision weight [out, in] as bitsandbytes quantizes it: each block's absmax, and each value
    divided by it rounded to the nearest of the table's (ties to the lower code). bitsandbytes' quantize_4bit
    gives the same codes but at near-ties (about one value in 10^7 of random weights, one code apart).
    Row chunks bound the temporary distances to the table. -> (codes, absmax)."""
    n, k = weight.shape
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n, k // block, device=weight.device)
    rows = max(1, (1 << 26) // (16 * k))  # the distances to the 16 values: 256 MB of float32 at a time
    for start in range(0, n, rows):
        blocks = weight[start:start + rows].float().reshape(-1, k // block, block)
        scale = blocks.abs().amax(-1)
        normalised = blocks / scale.clamp(min=1e-12).unsqueeze(-1)
        part = (normalised.unsqueeze(-1) - table.float()).abs().argmin(-1).reshape(-1, k).to(torch.uint8)
        codes[start:start + rows] = (part[:, 0::2] << 4) | part[:, 1::2]
        absmax[start:start + rows] = scale
    return codes, absmax
