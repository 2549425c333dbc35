"""Weight-only quantized matmuls: y[M, N] = x[M, K] @ W[N, K]^T with W stored in fewer bits and
expanded in registers, so a matmul moves fewer bytes than a 16-bit weight would: what makes
single-stream decode faster. Each kernel has its torch reference (the path for large batches and for
devices without Triton).

- 4-bit: integers, eight to an int32 along K, a scale and a zero point per group of `group_size`
  columns and output row: W[n, k] = (q[n, k] - 8 - zero[n, k // g]) * scale[n, k // g]. The words
  are interleaved in slices of S columns: in each run of 8 S columns, nibble j of word w is column
  j S + w. A kernel then unpacks nibble j of a row of words into S consecutive columns with one
  operation for all (no regrouping of registers); S = 1 is the plain order (nibble j of word w is
  column 8 w + j), what checkpoints store.
- 8-bit FP8 (e4m3) with a scale per block x block tile, as block-quantized FP8 checkpoints hold them,
  or INT8 with a scale per row and group of columns (GPTQ's 8-bit, llm-compressor's W8A16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops.fp16_operand import fp16_operand, fp16_operand_factor
from sageinfer.ops.int8_values import values_as
from sageinfer.ops.split_k import add_parts, split_launch


def slice_width_for(k: int, group: int, widest: int = 128) -> int:
    """The widest power-of-two slice, at most `widest`, that divides the group and whose runs of 8 S
    columns tile k: each slice then lies in one scale group."""
    s = widest
    while s > 1 and (group % s or k % (8 * s)):
        s //= 2
    return s


def unpack(packed: torch.Tensor, slice_width: int = 1) -> torch.Tensor:
    """[N, K / 8] int32 -> [N, K] int32 nibbles in [0, 15], in column order."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    q = (packed.unsqueeze(-1) >> shifts) & 0xF  # [N, words, nibble]
    if slice_width > 1:  # words (run, w), nibble j -> column (run, j, w)
        q = q.view(packed.shape[0], -1, slice_width, 8).transpose(2, 3)
    return q.reshape(packed.shape[0], -1)


def pack(q: torch.Tensor, slice_width: int = 1) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K / 8] int32 (the inverse of unpack)."""
    q = q.to(torch.int64)
    if slice_width > 1:
        q = q.reshape(q.shape[0], -1, 8, slice_width).transpose(2, 3)
    q = q.reshape(q.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               dtype: torch.dtype, slice_width: int = 1) -> torch.Tensor:
    """4-bit values above 8 plus their group's zero point (zeros None: symmetric, above 8), times the group's
    scale."""
    q = unpack(packed, slice_width).float() - 8.0
    if zeros is not None:
        q = q - zeros.float().repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return (q * s).to(dtype)


@triton.jit
def fp16_halves(t):
    """int32 words holding fp16 bits in each half -> the two halves as fp16 tensors (low, high)."""
    return t.to(tl.int16).to(tl.float16, bitcast=True), (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def nibbles_as_float(words, shift):
    """The 4-bit values at `shift` of int32 words as exact fp32 in [0, 15]: the nibble is placed
    under the exponent of 2^23 and 2^23 subtracted (two integer-free ops instead of a slow int to
    float conversion)."""
    bits = ((words >> shift) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def nibble_planes(words):
    """Each word's nibbles under the exponent of 2^23 (whose unit is 1): nibbles 0-4 (bits 0-19) and
    nibbles 5-7 (bits 20-31 moved down)."""
    return (words & 0xFFFFF) | 0x4B000000, ((words >> 20) & 0xFFF) | 0x4B000000


@triton.jit
def nibble_times_place(low, high, J: tl.constexpr):
    """2^23 + nibbles 0..J of their plane, as floats: less the same for J - 1 (2^23 where J starts a
    plane), nibble J times 16^(J % 5) exactly. One mask a nibble, no shift: the mask keeps the
    exponent's bits (0xFF800000, as int32) and the nibbles up to J."""
    plane = low if J < 5 else high
    if J == 4 or J == 7:  # the whole plane
        return plane.to(tl.float32, bitcast=True)
    return (plane & (-8388608 | ((16 << (4 * (J % 5))) - 1))).to(tl.float32, bitcast=True)


@triton.jit
def _bytes_as(raw, INT8: tl.constexpr, dtype: tl.constexpr):
    """8-bit weights loaded as bytes, as dtype: INT8 integers (through fp32's bits, not I2F, which runs at
    an eighth of the FP32 rate on sm_90: ops/int8_values.py), else FP8 e4m3."""
    return values_as(raw.to(tl.int8 if INT8 else tl.float8e4nv, bitcast=True), dtype)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn,
                 INT4: tl.constexpr, GROUP: tl.constexpr, SLICE: tl.constexpr, BLOCK_K: tl.constexpr,
                 INT8: tl.constexpr = False, HAS_ZERO: tl.constexpr = True):
    """Rows ns x columns ks (one group: k0 // GROUP) of the weight, expanded to fp32 and scaled; 4-bit
    values sit above 8 plus their zero point (HAS_ZERO), else above 8."""
    w_mask = n_mask[:, None] & k_mask[None, :]
    s = tl.load(s_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
    if INT4:
        if SLICE % BLOCK_K == 0:  # the tile lies in one slice: contiguous words, one shift
            word = (k0 // (8 * SLICE)) * SLICE + k0 % SLICE + tl.arange(0, BLOCK_K)
            shift = ((k0 // SLICE) % 8) * 4
        else:  # column c: word (c // 8 S) S + c % S, nibble (c // S) % 8
            word = (ks // (8 * SLICE)) * SLICE + ks % SLICE
            shift = (((ks // SLICE) % 8) * 4)[None, :]
        words = tl.load(w_ptr + ns[:, None] * stride_wn + word[None, :], mask=w_mask, other=0)
        q = nibbles_as_float(words, shift) - 8.0  # (small integers: exact in either order)
        if HAS_ZERO:
            q -= tl.load(z_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0).to(tl.float32)[:, None]
    else:
        raw = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0)
        q = _bytes_as(raw, INT8, tl.float32)
    return q * s[:, None]


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                        x_scale, part_ptr, counter_ptr, k_per_split, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                        FP16_DOT: tl.constexpr = False, SPLITS: tl.constexpr = 1, INT8: tl.constexpr = False):
    """8-bit weights (FP8 bytes, or INT8 ones) with the scale of each GROUP-wide part of the row; BLOCK_K
    divides GROUP: one scale column per K tile.
    FP16_DOT (FP8 with 16-bit x): the dot in fp16 on the raw FP8 values and x (ops/fp16_operand.py;
    widening each weight to fp32, scaling and narrowing it took three instructions more a weight),
    each K tile's product then times its scale and 1 / x_scale.
    SPLITS > 1: programs over parts of K too, k_per_split at a time (program_id(2)), finished in the
    same launch by the part that comes last (ops/split_k.py)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = ms < M, ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo, k_hi = 0, K
    if SPLITS > 1:
        k_lo = tl.program_id(2) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if FP16_DOT:
            x = fp16_operand(x, x_scale)
            raw = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :], mask=n_mask[:, None] & k_mask[None, :],
                          other=0)
            w = _bytes_as(raw, INT8, tl.float16)
            s = tl.load(s_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.dot(x, tl.trans(w)) * (s / x_scale)[None, :]
        else:
            w = _weight_tile(w_ptr, s_ptr, s_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn, False, GROUP, 1,
                             BLOCK_K, INT8).to(x.dtype)  # (8-bit: no zero points, no slices)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if SPLITS > 1:
        count, acc = add_parts(acc, part_ptr + ms[:, None] * N + ns[None, :], m_mask[:, None] & n_mask[None, :],
                               counter_ptr + pid_m * tl.num_programs(1) + pid_n, M * N, tl.program_id(2), SPLITS)
        if count != SPLITS - 1:
            return
    tl.store(y_ptr + ms[:, None] * stride_ym + ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                       INT4: tl.constexpr, GROUP: tl.constexpr, SLICE: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, INT8: tl.constexpr = False, HAS_ZERO: tl.constexpr = True):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    n_mask, k_mask = ns < N, ks < K
    w = _weight_tile(w_ptr, s_ptr, z_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn, INT4, GROUP, SLICE,
                     BLOCK_K, INT8, HAS_ZERO)
    tl.store(out_ptr + ns.to(tl.int64)[:, None] * stride_on + ks[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def expansion_run(w_ptr, out_ptr, N, stride_wn, stride_on, SLICE: tl.constexpr, BLOCK_N: tl.constexpr):
    """An expansion program's BLOCK_N rows (program_id(0)) and run of 8 SLICE columns (program_id(1)): the
    rows and their mask, the run, a slice's offsets, the run's words [BLOCK_N, SLICE] (each read once)
    and the output rows."""
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    run = tl.program_id(1)
    n_mask = ns < N
    ws = tl.arange(0, SLICE)
    words = tl.load(w_ptr + ns.to(tl.int64)[:, None] * stride_wn + (run * SLICE + ws)[None, :],
                    mask=n_mask[:, None], other=0)
    return ns, n_mask, run, ws, words, out_ptr + ns.to(tl.int64)[:, None] * stride_on


@triton.jit
def _int4_dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                            SLICE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ZERO: tl.constexpr = True):
    """One run of 8 SLICE columns of BLOCK_N rows: each word read once, its eight nibbles written as
    eight slices of consecutive columns (above 8 plus their zero points with HAS_ZERO, else above 8)."""
    ns, n_mask, run, ws, words, out_rows = expansion_run(w_ptr, out_ptr, N, stride_wn, stride_on, SLICE, BLOCK_N)
    for j in tl.static_range(8):
        k0 = (run * 8 + j) * SLICE
        s = tl.load(s_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        q = nibbles_as_float(words, 4 * j) - 8.0  # (small integers: exact in either order)
        if HAS_ZERO:
            q -= tl.load(z_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0).to(tl.float32)[:, None]
        w = q * s[:, None]
        tl.store(out_rows + (k0 + ws)[None, :], w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


# Below this slice width the one-pass expansion reads each word per column instead.
_MIN_RUN_SLICE = 16


def _dequantize_launch(w, scales, zeros, int4: bool, group: int, n: int, k: int, dtype: torch.dtype,
                       slice_width: int = 1, int8: bool = False) -> torch.Tensor:
    """The whole weight expanded in one pass (reads its bytes once, writes dtype once): what larger
    batches multiply with the library GEMM, instead of the torch reference's several fp32 passes.
    zeros None: 4-bit values without zero points (symmetric)."""
    has_zero = zeros is not None
    zeros = zeros if has_zero else scales  # (a pointer the kernels do not read)
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    if int4 and slice_width >= _MIN_RUN_SLICE:
        block_n = 16
        _int4_dequantize_kernel[(triton.cdiv(n, block_n), k // (8 * slice_width))](
            w, scales, zeros, out, n, w.stride(0), scales.stride(0), out.stride(0), GROUP=group, SLICE=slice_width,
            BLOCK_N=block_n, HAS_ZERO=has_zero)
        return out
    block_n, block_k = 32, min(128, group & -group)  # a power of two that divides the group
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](w, scales, zeros, out, n, k, w.stride(0), scales.stride(0), out.stride(0),
                             INT4=int4, GROUP=group, SLICE=slice_width, BLOCK_N=block_n, BLOCK_K=block_k, INT8=int8,
                             HAS_ZERO=has_zero)
    return out


def check_int4_layout(packed, scales, group_size, slice_width, what: str) -> None:
    """Packed 4-bit words, their scales, group and slice width agree (one scale group a slice)."""
    n, k = packed.shape[0], packed.shape[1] * 8
    if k % group_size or scales.shape != (n, k // group_size) or k % (8 * slice_width) or group_size % slice_width:
        raise ValueError(f"{what}: packed {tuple(packed.shape)}, scales {tuple(scales.shape)}, group {group_size} "
                         f"and slice width {slice_width} do not fit")


def dequantize_kernel(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                      dtype: torch.dtype, slice_width: int = 1) -> torch.Tensor:
    """`dequantize` in one Triton pass."""
    check_int4_layout(packed, scales, group_size, slice_width, "dequantize")
    return _dequantize_launch(packed, scales.contiguous(), zeros.contiguous() if zeros is not None else None, True,
                              group_size, packed.shape[0], packed.shape[1] * 8, dtype, slice_width)


def dequantize_8bit_groups_kernel(weight: torch.Tensor, scale: torch.Tensor, block: int,
                                  dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_8bit_groups` in one Triton pass."""
    n, k = weight.shape
    if scale.shape != (n, (k + block - 1) // block):
        raise ValueError(f"dequantize_8bit_groups: weight {tuple(weight.shape)}, scale {tuple(scale.shape)} and "
                         f"block {block} do not fit")
    scale = scale.float().contiguous()
    return _dequantize_launch(weight.view(torch.uint8), scale, scale, False, block, n, k, dtype,
                              int8=weight.dtype == torch.int8)


def _launch_8bit_groups(x, w, scales, group: int, n: int, block_m: int, block_n: int, block_k: int,
                        min_programs: int = 0, int8: bool = False):
    m, k = x.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    parts, split = split_launch(grid[0] * grid[1], block_k, k, m, n, min_programs, y)
    fp16_dot = x.dtype in (torch.bfloat16, torch.float16)
    _weight_only_kernel[grid + (parts,)](
        x, w, scales, y, m, n, k, x.stride(0), w.stride(0), scales.stride(0), y.stride(0),
        1.0 / fp16_operand_factor(x), GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 models: exact sums
        FP16_DOT=fp16_dot, INT8=int8, **split)
    return y


def dequantize_8bit_groups(weight: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """8-bit weight [N, K] (FP8 e4m3 or INT8) with the scale of each row's groups of `block` columns
    (FP8's block x block tiles given per row), [N, ceil(K / b)] -> [N, K]."""
    k = weight.shape[1]
    return (weight.float() * scale.float().repeat_interleave(block, 1)[:, :k]).to(dtype)


# Up to this many rows the 8-bit weight-only layers (block FP8, W8A16) take w8a16_block_matmul; above it
# their weights are expanded for the library GEMM (or, block FP8, go to a block-scaled GEMM).
W8A16_MAX_ROWS = 64


def w8a16_block_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: int,
                       block_m: int = 16, block_n: int = 64, block_k: int = 64, min_programs: int = 0) -> torch.Tensor:
    """x [M, K] @ (8-bit weight [N, K], FP8 e4m3 or INT8, x its scales per row and group of `block`
    columns: [N, ceil(K / block)])^T -> [M, N] in x's dtype: the weights stream at one byte each and are
    scaled in registers. min_programs: split K too where the output tiles are fewer (0: never)."""
    m, k = x.shape
    n = weight.shape[0]
    block_k = min(block_k, block)
    if weight.shape[1] != k or block % block_k or scale.shape != (n, (k + block - 1) // block):
        raise ValueError(f"w8a16: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(scale.shape)} "
                         f"and block {block} do not fit")
    scale = scale.float().contiguous()
    return _launch_8bit_groups(x.contiguous(), weight.view(torch.uint8), scale, block, n, block_m, block_n, block_k,
                               min_programs, int8=weight.dtype == torch.int8)
