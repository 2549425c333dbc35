"""FP4 e2m1 weights held at four bits, with their torch reference and one-pass expansion.

Layout: eight values to an int32 word along the input, interleaved in slices of S columns as
ops/weight_only.py's 4-bit integers are (value j of word w of a run of 8 S columns is column j S + w),
but each value's bits placed so that one shift and a mask (two for values 1 and 3) make it fp16. Value
j lies in half j // 4 of its word; in that half, value J = j % 4 holds its three magnitude bits (e2m1's
two exponent bits, then its mantissa bit, from the top) from bit _MAGNITUDE[J] and its sign at bit
_SIGN[J]. Moved to bits 9-11 and 15, they are the fp16 bits of the value times 2^-14 (exactly: 0.5
becomes fp16's subnormal 2^-15, the others normal numbers). Values 0 and 2 keep their sign six bits
above their magnitude, as fp16 does: one shift and one AND make them; no four positions do that for
all (sass: 11 integer instructions a word against 15 for plain nibbles).

Scales: a byte per row and group of input columns, NVFP4's FP8 e4m3 or MXFP4's E8M0 exponent
(2^(e - 127)), and a float32 per row (NVFP4: 1 / its tensor's global scale; MXFP4: 1):
w = e2m1 * group scale * row scale. Where a slice holds whole groups (T = S / group of them), each run's
scales are stored slice-minor ([T, 8] instead of [8, T]): a thread of the one-row loop, which sums four
columns of one slice position in each of the eight slices, then reads its eight scales of a run as two
words instead of eight bytes at eight addresses.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops.weight_only import expansion_run, fp16_halves

_MAGNITUDE = (0, 3, 8, 11)
_SIGN = (6, 7, 14, 15)
# e2m1 of a code's low three bits
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# int32 masks: bits 9-11 and 15 of both halves (0x8E008E00), 9-11 (0x0E000E00), 15 (0x80008000)
_SIGNED_FP16_BITS = tl.constexpr(-0x71FF7200)
_MAGNITUDE_BITS = tl.constexpr(0x0E000E00)
_SIGN_BITS = tl.constexpr(-0x7FFF8000)


def fp4_pack(codes: torch.Tensor, slice_width: int) -> torch.Tensor:
    """[N, K] e2m1 codes (sign in bit 3, as checkpoints hold them) -> [N, K / 8] int32 in this layout."""
    n = codes.shape[0]
    c = codes.to(torch.int64).reshape(n, -1, 8, slice_width).transpose(2, 3)  # [N, runs, word, value j]
    words = torch.zeros(c.shape[:-1], dtype=torch.int64, device=codes.device)
    for j in range(8):
        base = 16 * (j // 4)
        words |= (c[..., j] & 7) << (base + _MAGNITUDE[j % 4])
        words |= (c[..., j] >> 3) << (base + _SIGN[j % 4])
    words = words.reshape(n, -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def fp4_unpack(words: torch.Tensor, slice_width: int) -> torch.Tensor:
    """The inverse of fp4_pack: [N, K / 8] int32 -> [N, K] codes in [0, 15]."""
    n = words.shape[0]
    w = words.to(torch.int64) & 0xFFFFFFFF
    values = []
    for j in range(8):
        base = 16 * (j // 4)
        magnitude = (w >> (base + _MAGNITUDE[j % 4])) & 7
        values.append(magnitude | (((w >> (base + _SIGN[j % 4])) & 1) << 3))
    c = torch.stack(values, -1).view(n, -1, slice_width, 8).transpose(2, 3)
    return c.reshape(n, -1).to(torch.int32)


def scales_run_major(scale: torch.Tensor, group: int, slice_width: int) -> torch.Tensor:
    """[N, G] scale bytes in column order -> the layout's order (each run's [8, T] as [T, 8] where a slice
    holds T whole groups; else as they are)."""
    if slice_width % group:
        return scale
    t = slice_width // group
    return scale.reshape(scale.shape[0], -1, 8, t).transpose(2, 3).reshape(scale.shape[0], -1).contiguous()


def scales_column_order(scale: torch.Tensor, group: int, slice_width: int) -> torch.Tensor:
    """The inverse of scales_run_major."""
    if slice_width % group:
        return scale
    t = slice_width // group
    return scale.reshape(scale.shape[0], -1, t, 8).transpose(2, 3).reshape(scale.shape[0], -1).contiguous()


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] -> their e2m1 values as float32."""
    magnitude = torch.tensor(_E2M1, device=codes.device)[(codes & 7).long()]
    return torch.where(codes >= 8, -magnitude, magnitude)


def group_scale_values(scale: torch.Tensor, e8m0: bool) -> torch.Tensor:
    """Scale bytes -> float32: E8M0 exponents (2^(e - 127); e = 0, 2^-127, reads 0 as in the kernels) or
    FP8 e4m3."""
    if e8m0:
        e = scale.to(torch.int32)
        return torch.where(e > 0, torch.ldexp(torch.ones_like(e, dtype=torch.float32), e - 127), 0.0)
    return scale.view(torch.float8_e4m3fn).float()


def fp4_dequantize(words: torch.Tensor, scale: torch.Tensor, row_scale: torch.Tensor, group: int, e8m0: bool,
                   dtype: torch.dtype, slice_width: int) -> torch.Tensor:
    """The torch reference: [N, K / 8] words, [N, K / group] scale bytes (in the layout's order), [N] row
    scales -> [N, K]."""
    s = group_scale_values(scales_column_order(scale, group, slice_width), e8m0).repeat_interleave(group, 1)
    w = e2m1_values(fp4_unpack(words, slice_width)) * s * row_scale.float()[:, None]
    return w.to(dtype)


@triton.jit
def fp4_half_bits(words, J: tl.constexpr):
    """int32 words -> values J and J + 4 of each as fp16 bits of the value times 2^-14, in the word's two
    halves."""
    if J == 0:
        return (words << 9) & _SIGNED_FP16_BITS
    if J == 1:
        return ((words << 6) & _MAGNITUDE_BITS) | ((words << 8) & _SIGN_BITS)
    if J == 2:
        return (words << 1) & _SIGNED_FP16_BITS
    return ((words >> 2) & _MAGNITUDE_BITS) | (words & _SIGN_BITS)


@triton.jit
def fp4_halves(words, J: tl.constexpr):
    """Values J and J + 4 of int32 words as fp16, each the value times 2^-14."""
    return fp16_halves(fp4_half_bits(words, J))


@triton.jit
def fp4_value(words, j: tl.constexpr):
    """Value j of int32 words as float32, times 2^-14."""
    low, high = fp4_halves(words, j % 4)
    return (high if j >= 4 else low).to(tl.float32)


@triton.jit
def scale_offsets(ks, GROUP: tl.constexpr, SLICE: tl.constexpr):
    """The offsets of columns ks' scale bytes in their row (scales_run_major's order)."""
    if SLICE % GROUP == 0:
        T: tl.constexpr = SLICE // GROUP
        return (ks // (8 * SLICE)) * (8 * T) + ((ks % SLICE) // GROUP) * 8 + (ks // SLICE) % 8
    return ks // GROUP


@triton.jit
def scale_in_word(word, BYTE: tl.constexpr, E8M0: tl.constexpr):
    """Scale byte BYTE of int32 words as float32: E8M0 (its bits moved into fp32's exponent) or FP8 e4m3."""
    if E8M0:
        if BYTE == 3:
            return ((word >> 1) & 0x7F800000).to(tl.float32, bitcast=True)
        return ((word << (23 - 8 * BYTE)) & 0x7F800000).to(tl.float32, bitcast=True)
    return ((word >> (8 * BYTE)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)


@triton.jit
def group_scales(scale_ptr, offsets, mask, E8M0: tl.constexpr):
    """Scale bytes at offsets as float32: E8M0 exponents (2^(e - 127); e = 0 reads 0) or FP8 e4m3."""
    return scale_in_word(tl.load(scale_ptr + offsets, mask=mask, other=0).to(tl.int32), 0, E8M0)


@triton.jit
def _fp4_dequantize_kernel(w_ptr, s_ptr, row_s_ptr, out_ptr, N, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                           SLICE: tl.constexpr, BLOCK_N: tl.constexpr, E8M0: tl.constexpr):
    """One run of 8 SLICE columns of BLOCK_N rows: each word read once, its eight values written as
    eight slices of consecutive columns."""
    ns, n_mask, run, ws, words, out_rows = expansion_run(w_ptr, out_ptr, N, stride_wn, stride_on, SLICE, BLOCK_N)
    row_s = tl.load(row_s_ptr + ns, mask=n_mask, other=0.0) * 16384.0  # (values come out times 2^-14)
    for j in tl.static_range(8):
        ks = (run * 8 + j) * SLICE + ws
        s = group_scales(s_ptr, ns[:, None] * stride_sn + scale_offsets(ks, GROUP, SLICE)[None, :], n_mask[:, None],
                         E8M0)
        w = fp4_value(words, j) * s * row_s[:, None]
        tl.store(out_rows + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def check_fp4_layout(words, scale, row_scale, group: int, slice_width: int, what: str) -> None:
    n, k = words.shape[0], words.shape[1] * 8
    if (words.dtype != torch.int32 or scale.dtype != torch.uint8 or k % group or scale.shape != (n, k // group)
            or row_scale.shape != (n,) or k % (8 * slice_width) or slice_width % 4 or group % 4):
        raise ValueError(f"{what}: FP4 words {tuple(words.shape)} {words.dtype}, scale bytes {tuple(scale.shape)} "
                         f"{scale.dtype}, row scales {tuple(row_scale.shape)}, groups of {group} and slices of "
                         f"{slice_width} do not fit")


def fp4_dequantize_kernel(words: torch.Tensor, scale: torch.Tensor, row_scale: torch.Tensor, group: int, e8m0: bool,
                          dtype: torch.dtype, slice_width: int) -> torch.Tensor:
    """`fp4_dequantize` in one Triton pass (what larger batches multiply with the library GEMM)."""
    check_fp4_layout(words, scale, row_scale, group, slice_width, "fp4_dequantize")
    n, k = words.shape[0], words.shape[1] * 8
    out = torch.empty(n, k, dtype=dtype, device=words.device)
    block_n = 16
    _fp4_dequantize_kernel[(triton.cdiv(n, block_n), k // (8 * slice_width))](
        words, scale, row_scale, out, n, words.stride(0), scale.stride(0), out.stride(0), GROUP=group,
        SLICE=slice_width, BLOCK_N=block_n, E8M0=e8m0)
    return out
