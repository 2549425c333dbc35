"""One-row 4-bit matmul in fp16 pairs: ops/gemv_int4.py's contract (the gated input, the folded RMSNorm,
the residual add, split K) for decode of one sequence, with the arithmetic of a weight halved.

The fp32 kernel spends about 6.7 instructions a weight on an sm_90 (a mask, a subtraction and two FMAs
at least; benchmarks/experiments/sass_loop.py int4-gemv); this one 2.9. Here each thread takes four consecutive words of a row (32 weights: nibble j of the four
words is columns j S + 4 i .. 4 i + 3 of the run) and handles nibbles j and j + 4 together as one pair
of fp16: one AND-OR makes both weights, one FMA multiplies both by their inputs and adds, and the four
words' products stay in fp16 pairs until one conversion to fp32 per nibble; the group scales and
zero points then apply per nibble. NVIDIA's backend does this in PTX (platforms/cuda_device.py); other
backends and the interpreter run the same arithmetic in plain Triton (fp32), so the kernel, its
indexing and its fusions are tested everywhere. On an H200 the fewer instructions bought less than
they promised: L1 TPOT 4.71 -> 4.56 ms (benchmarks/results/2026-12-02e-h200-suite-int8-words-int4-pairs.md),
so instructions were not all that bounded the fp32 kernel.

Inputs go to fp16 scaled by 2^-6: four products of at most 8 |x| 2^-6 stay below fp16's 65504 for |x|
up to 131,000 (activations of bf16 models stay far below), and inputs under 2^-8 lose at most 2^-19
to fp16's subnormals, less than bf16 itself keeps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.gemv import fused_input
from sageinfer.ops.split_k import add_parts, split_launch
from sageinfer.platforms.cuda_device import four_words_dot, pack_halves

X_SCALE = tl.constexpr(1.0 / 64)  # inputs times this in fp16 (see above); the sums divided by it at the end
# Rows per program, warps, stages, and the programs that split K brings a launch to (o and down have
# 4096 outputs: 128 programs of 32 rows on an H200's 132 processors). The best of 18 timed on an H200
# (benchmarks/experiments/tune_int4_halves.py: 5.20 ms for 36 layers' four matmuls, the times noisy).
HALVES_CONFIG = {"block_n": 32, "num_warps": 4, "num_stages": 1, "min_programs": 256}


@triton.jit
def _half_bits(v):
    """An fp32 value rounded to fp16, as the low 16 bits of an int32."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _pack(lo, hi, PTX: tl.constexpr):
    if PTX:
        return pack_halves(lo, hi)
    return _half_bits(lo) | (_half_bits(hi) << 16)


@triton.jit
def _half(pair, HIGH: tl.constexpr):
    bits = (pair >> 16) if HIGH else pair
    return (bits & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble_dot(w, xp, J: tl.constexpr):
    """(nibble J of w - 8) * its input from pair xp (nibbles J % 4 and J % 4 + 4), in fp32."""
    q = ((w >> (4 * J)) & 0xF).to(tl.float32) - 8.0
    return q * _half(xp, J >= 4)


@triton.jit
def _words_dot(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23, x30, x31, x32, x33,
               PTX: tl.constexpr):
    if PTX:
        return four_words_dot(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23,
                              x30, x31, x32, x33)
    d0 = _nibble_dot(w0, x00, 0) + _nibble_dot(w1, x10, 0) + _nibble_dot(w2, x20, 0) + _nibble_dot(w3, x30, 0)
    d1 = _nibble_dot(w0, x01, 1) + _nibble_dot(w1, x11, 1) + _nibble_dot(w2, x21, 1) + _nibble_dot(w3, x31, 1)
    d2 = _nibble_dot(w0, x02, 2) + _nibble_dot(w1, x12, 2) + _nibble_dot(w2, x22, 2) + _nibble_dot(w3, x32, 2)
    d3 = _nibble_dot(w0, x03, 3) + _nibble_dot(w1, x13, 3) + _nibble_dot(w2, x23, 3) + _nibble_dot(w3, x33, 3)
    d4 = _nibble_dot(w0, x00, 4) + _nibble_dot(w1, x10, 4) + _nibble_dot(w2, x20, 4) + _nibble_dot(w3, x30, 4)
    d5 = _nibble_dot(w0, x01, 5) + _nibble_dot(w1, x11, 5) + _nibble_dot(w2, x21, 5) + _nibble_dot(w3, x31, 5)
    d6 = _nibble_dot(w0, x02, 6) + _nibble_dot(w1, x12, 6) + _nibble_dot(w2, x22, 6) + _nibble_dot(w3, x32, 6)
    d7 = _nibble_dot(w0, x03, 7) + _nibble_dot(w1, x13, 7) + _nibble_dot(w2, x23, 7) + _nibble_dot(w3, x33, 7)
    return d0, d1, d2, d3, d4, d5, d6, d7


@triton.jit
def _quarters(t):
    """[..., 4] -> its four [...] parts in order."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2)))
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    return q0, q1, q2, q3


@triton.jit
def _eighths(t):
    """[..., 8] -> its eight [...] parts in order."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (2, 2, 2)))
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    p0, p4 = tl.split(e0)
    p2, p6 = tl.split(e1)
    p1, p5 = tl.split(o0)
    p3, p7 = tl.split(o1)
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _nibble_inputs(x_ptr, cols, K, rstd, norm_w_ptr, HAS_ZERO: tl.constexpr, GATED: tl.constexpr,
                   PRENORM: tl.constexpr):
    """One nibble's inputs for the four words of each quad (cols [1, QUADS, 4], contiguous: one load),
    apart, and their sum where zero points need it."""
    x = fused_input(x_ptr, 0, cols, True, 0, K, rstd, norm_w_ptr, GATED, PRENORM) * X_SCALE
    x_sum = tl.sum(x, 2) if HAS_ZERO else tl.zeros(x.shape[:-1], dtype=tl.float32)
    q0, q1, q2, q3 = _quarters(x)
    return q0, q1, q2, q3, x_sum


@triton.jit
def _int4_gemv_halves_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, norm_w_ptr, y_ptr, N, K, stride_wn,
                             stride_sn, eps, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr,
                             HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                             PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr,
                             PTX: tl.constexpr, part_ptr, counter_ptr, k_per_split, SPLITS: tl.constexpr):
    """y [1, N] = x [1, K] @ W^T, BLOCK_N rows a program, a run of 8 SLICE columns (SLICE words a row)
    a step: words [BLOCK_N, SLICE / 4, 4] loaded whole, each thread's four words of a row taken apart.
    SPLITS > 1: programs over parts of K too (program_id(1)), as ops/gemv_int4.py splits."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    QUADS: tl.constexpr = SLICE // 4
    quads = tl.arange(0, QUADS)
    w_offs = rows[:, None, None].to(tl.int64) * stride_wn + (4 * quads)[None, :, None] + tl.arange(0, 4)[None, None, :]
    w_mask = row_mask[:, None, None]
    RUN: tl.constexpr = 8 * SLICE
    k_lo, k_hi = 0, K
    if SPLITS > 1:
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    # Runs start at multiples of SLICE words: said, so that each thread's four words load as one.
    words = tl.load(w_ptr + w_offs + tl.multiple_of(k_lo // 8, SLICE), mask=w_mask, other=0)  # no kernel writes weights
    launch.wait_for_previous_kernel(USE_PDL)
    rstd = 0.0
    if PRENORM:
        sum_sq = tl.zeros((RUN,), dtype=tl.float32)
        for k0 in range(0, K, RUN):
            xr = tl.load(x_ptr + k0 + tl.arange(0, RUN)).to(tl.float32)
            sum_sq += xr * xr
        rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, 0) / K + eps)
    s_rows = scale_ptr + rows[:, None].to(tl.int64) * stride_sn
    z_rows = zero_ptr + rows[:, None].to(tl.int64) * stride_sn
    s_rows3 = s_rows[:, :, None]
    z_rows3 = z_rows[:, :, None]
    acc = tl.zeros((BLOCK_N, QUADS), dtype=tl.float32)
    for k_run in range(k_lo, k_hi, RUN):
        k0 = tl.multiple_of(k_run, RUN)
        run_words = words
        if k0 + RUN < k_hi:  # the next run's words in flight while this one is used
            words = tl.load(w_ptr + w_offs + tl.multiple_of((k0 + RUN) // 8, SLICE), mask=w_mask, other=0)
        w0, w1, w2, w3 = _quarters(run_words)
        cols = k0 + 4 * quads[None, :, None] + tl.arange(0, 4)[None, None, :]
        a0, b0, c0, d0, xs0 = _nibble_inputs(x_ptr, cols, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a1, b1, c1, d1, xs1 = _nibble_inputs(x_ptr, cols + SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a2, b2, c2, d2, xs2 = _nibble_inputs(x_ptr, cols + 2 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a3, b3, c3, d3, xs3 = _nibble_inputs(x_ptr, cols + 3 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a4, b4, c4, d4, xs4 = _nibble_inputs(x_ptr, cols + 4 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a5, b5, c5, d5, xs5 = _nibble_inputs(x_ptr, cols + 5 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a6, b6, c6, d6, xs6 = _nibble_inputs(x_ptr, cols + 6 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        a7, b7, c7, d7, xs7 = _nibble_inputs(x_ptr, cols + 7 * SLICE, K, rstd, norm_w_ptr, HAS_ZERO, GATED, PRENORM)
        # words a, b, c, d of each quad; pair p holds nibbles p and p + 4
        n0, n1, n2, n3, n4, n5, n6, n7 = _words_dot(
            w0, w1, w2, w3,
            _pack(a0, a4, PTX), _pack(a1, a5, PTX), _pack(a2, a6, PTX), _pack(a3, a7, PTX),
            _pack(b0, b4, PTX), _pack(b1, b5, PTX), _pack(b2, b6, PTX), _pack(b3, b7, PTX),
            _pack(c0, c4, PTX), _pack(c1, c5, PTX), _pack(c2, c6, PTX), _pack(c3, c7, PTX),
            _pack(d0, d4, PTX), _pack(d1, d5, PTX), _pack(d2, d6, PTX), _pack(d3, d7, PTX), PTX)
        group = k0 // GROUP  # nibble j lies in group (k0 + j SLICE) // GROUP; SLICE divides GROUP
        if SLICE >= GROUP:  # the run's eight groups of a row in one load
            G: tl.constexpr = SLICE // GROUP
            eight = group + G * tl.arange(0, 8)[None, None, :]
            s0, s1, s2, s3, s4, s5, s6, s7 = _eighths(tl.load(s_rows3 + eight).to(tl.float32))
            if HAS_ZERO:
                z0, z1, z2, z3, z4, z5, z6, z7 = _eighths(tl.load(z_rows3 + eight).to(tl.float32))
                n0 -= z0 * xs0
                n1 -= z1 * xs1
                n2 -= z2 * xs2
                n3 -= z3 * xs3
                n4 -= z4 * xs4
                n5 -= z5 * xs5
                n6 -= z6 * xs6
                n7 -= z7 * xs7
            acc += n0 * s0 + n1 * s1 + n2 * s2 + n3 * s3 + n4 * s4 + n5 * s5 + n6 * s6 + n7 * s7
        else:  # the run lies in one group
            n = n0 + n1 + n2 + n3 + n4 + n5 + n6 + n7
            if HAS_ZERO:
                n -= tl.load(z_rows + group).to(tl.float32) * (xs0 + xs1 + xs2 + xs3 + xs4 + xs5 + xs6 + xs7)
            acc += n * tl.load(s_rows + group).to(tl.float32)
    y_acc = tl.sum(acc, 1) * (1.0 / X_SCALE)
    if SPLITS > 1:
        count, y_acc = add_parts(y_acc, part_ptr + rows, row_mask, counter_ptr + pid, N, tl.program_id(1), SPLITS)
        if count != SPLITS - 1:
            return
    if HAS_BIAS:
        y_acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    y = y_acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)  # rounded as the model's dtype rounds
    if ADD_TO_Y:  # residual + layer output, rounded as two tensors of the model's dtype add
        y = y + tl.load(y_ptr + rows, mask=row_mask, other=0.0)
    tl.store(y_ptr + rows, y, mask=row_mask)


def halves_fit(m: int, group: int, slice_width: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel takes this call: one row of 16-bit inputs (fp32 models keep fp32 products),
    slices of at least 16 words whose quarter is a power of two, and groups that hold whole slices or
    whole runs."""
    return (m == 1 and dtype in (torch.bfloat16, torch.float16) and slice_width >= 16 and slice_width & (slice_width - 1) == 0
            and (group % slice_width == 0 and (slice_width >= group or group % (8 * slice_width) == 0)))


def int4_gemv_halves(x, weight, weight_scale, weight_zero, group: int, slice_width: int, y, bias, gated: bool,
                     norm_weight, eps: float, add_to_y: bool, ptx: bool, config: dict | None = None):
    """Launched by ops.gemv_int4.int4_gemv for one row where halves_fit; writes (or adds to) y [1, N].
    ptx: the platform runs NVIDIA's PTX (the pairs in fp16x2); else the same arithmetic in fp32."""
    n, k = weight.shape[0], weight.shape[1] * 8
    cfg = config or HALVES_CONFIG
    tiles = triton.cdiv(n, cfg["block_n"])
    parts, split = split_launch(tiles, 8 * slice_width, k, 1, n, cfg.get("min_programs", 0), y)
    _int4_gemv_halves_kernel[(tiles, parts)](
        x, weight, weight_scale, weight_zero if weight_zero is not None else weight_scale,
        bias if bias is not None else x, norm_weight if norm_weight is not None else x, y, n, k,
        weight.stride(0), weight_scale.stride(0), eps, GROUP=group, SLICE=slice_width,
        HAS_ZERO=weight_zero is not None, HAS_BIAS=bias is not None, BLOCK_N=cfg["block_n"], GATED=gated,
        PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y, PTX=ptx, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **split, **launch.dependent_launch_kwargs())
    return y
