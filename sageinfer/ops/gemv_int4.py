"""Skinny matmul of 4-bit weights for decode of a few sequences: ops/gemv.py's contract (up to
MAX_ROWS rows, the gated input, the folded RMSNorm, the residual add) over ops/weight_only.py's
words interleaved in slices of S columns.

Each program owns BLOCK_N output features and walks K a run of 8 S columns at a time: it loads the
run's [BLOCK_N, S] words once (the next run's are requested before this one is used), and for each
of the eight nibbles takes one mask and one subtraction to get S consecutive columns as floats,
multiplies them by their group's scale less the zero point, and accumulates x * w element-wise; one
reduction at the end. No int-to-float conversion, no regrouping of registers: at one row that is
what held the plain layout's kernel to a fifth of the memory's rate.

Where NVIDIA's PTX runs and the inputs are 16-bit, the same loop works in fp16 pairs instead
(_half_sums_loop): one AND-OR makes a word's nibbles j and j + 4 fp16 1024 + n, and the arithmetic runs
two weights an instruction, each thread's inputs brought to fp16's range by a power of two of its own.

A second kernel does the same on the tensor cores (rows padded to 16, the weights dequantized in
registers as the MMA's first operand): fewer instructions a weight, and 2-8 rows cost what one does.

Both also run FP4 e2m1 words (ops/fp4_weights.py, FP4=True): the fp16-pair loop with its own decode and
the scale bytes of each thread's columns, the tensor-core kernel a group's columns a dot.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.gemv import (finish_rows, formed_input, fused_input, program_tile_3d, quarters, raw_input,
                                rms_scaled, silu_times)
from sageinfer.ops.split_k import add_parts, split_launch
from sageinfer.ops.weight_only import check_int4_layout, fp16_halves, nibble_planes, nibble_times_place
from sageinfer.ops.fp4_weights import (check_fp4_layout, fp4_halves, fp4_value, group_scales, scale_in_word,
                                        scale_offsets)
from sageinfer.platforms.cuda_device import fp4_pair_sums, nibble_pair_sums, pack_half2, ptx_arch

# The best of 20 tried on an H200 at Qwen3-8B shapes, one row, each layer with its decode-step fusions
# (benchmarks/experiments/tune_int4_gemv.py; 5.0 ms for 36 layers' four matmuls against 5.5 for bf16
# weights through ops/gemv.py). block_n is for one row: more rows take fewer output features per
# program, so that the [rows, block_n, slice] accumulator stays in registers. "mma": True takes the
# tensor-core kernel instead: at one row it measured slower (the four matmuls 161.6 against 101.5 us
# on an H200), from 2 rows faster, which is where W4A16 layers use it (w4a16_mma_matmul).
# "min_programs": split K too where the output tiles are fewer (o and down: 128 programs on an H200's
# 132 processors); SAGEINFER_INT4_GEMV_MIN_PROGRAMS sets it, 0 (no split) until timed on a GPU
# (time_int4_step.py's path "gemv split").
# "quad_sums": each thread sums its four consecutive columns' products before the group scale, which
# then costs one FMA per four weights instead of one per weight (sm_90 loop 855 -> 759 instructions).
# On an H200 qkv, o and gate_up got 7-13% faster and a gated down 50% slower, so gated inputs keep the
# per-weight loop (W4A16 layers hand down a plain input: layers/linear.py); Qwen3-8B W4A16 L1 TPOT
# 4.72 -> 4.51 ms, 4.38 -> 3.92 with the plain input (2026-12-02g-h200-w4a16-one-row-defaults.md).
# SAGEINFER_INT4_QUAD_SUMS=0 turns it off.
# "run_scales": the quad-sum loop reads a run's scales (and zero points) once where the groups allow
# (_run_scales; 759 -> 630 instructions a trip): the step's 4-bit matmuls 2.92 -> 2.85 ms in CUDA
# graphs, L1 TPOT 3.92 -> 3.74 ms on an H200, twice each, alternating (same results file).
# SAGEINFER_INT4_RUN_SCALES=0 turns it off.
# "half_sums": the quad-sum loop in fp16 pairs (_half_sums_loop; sm_90 loop 630 -> 519 instructions a trip
# with NVIDIA's packed instructions), None: where Triton compiles PTX for sm_80 on and the inputs are 16-bit.
# "ahead": runs of words in flight beyond the one in use, 0: two for the fp16-pair loop, one for the fp32
# one. On an H200 the step's 144 one-row 4-bit matmuls 2.84 -> 2.70 ms in CUDA graphs, W4A16 L1 TPOT 3.74 ->
# 3.50 ms with one run ahead, 3.45 with two; the fp32 loop got slower with two (3.86 ms)
# (benchmarks/results/2026-12-03b-h200-w4a16-half-sums.md). SAGEINFER_INT4_HALF_SUMS=0|1 and
# SAGEINFER_INT4_AHEAD=1|2 force them. Requesting the next run's inputs and scales a run early as well
# (the loop waits on them at the top of each trip) measured 3.33 against 3.28 ms and was removed
# (benchmarks/results/2026-12-03c-h200-fp4-four-bits.md).
INT4_GEMV_CONFIG = {"block_n": 32, "num_warps": 8, "num_stages": 2,
                    "min_programs": int(os.environ.get("SAGEINFER_INT4_GEMV_MIN_PROGRAMS", "0")),
                    "quad_sums": os.environ.get("SAGEINFER_INT4_QUAD_SUMS", "1") != "0",
                    "run_scales": os.environ.get("SAGEINFER_INT4_RUN_SCALES", "1") != "0",
                    "half_sums": {"0": False, "1": True}.get(os.environ.get("SAGEINFER_INT4_HALF_SUMS", "")),
                    "ahead": int(os.environ.get("SAGEINFER_INT4_AHEAD", "0"))}


@triton.jit
def _scale_and_offset(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, group, HAS_ZERO: tl.constexpr):
    """A group's scale of each row and the value its nibbles are stored above (8, plus the zero point)."""
    s = tl.load(scale_ptr + rows3 * stride_sn + group, mask=row_mask3, other=0.0).to(tl.float32)
    offset = 8.0
    if HAS_ZERO:
        offset += tl.load(zero_ptr + rows3 * stride_sn + group, mask=row_mask3, other=0).to(tl.float32)
    return s, offset


@triton.jit
def _eighths(t):
    """[A, B, 8] -> its eight [A, B, 1] parts, in order."""
    q0, q1, q2, q3 = quarters(t)  # [A, B, 2]: elements i and 4 + i
    p0, p4 = tl.split(q0)
    p1, p5 = tl.split(q1)
    p2, p6 = tl.split(q2)
    p3, p7 = tl.split(q3)
    return (p0[:, :, None], p1[:, :, None], p2[:, :, None], p3[:, :, None], p4[:, :, None], p5[:, :, None],
            p6[:, :, None], p7[:, :, None])


@triton.jit
def _load_run_scales(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, k0, GROUP: tl.constexpr,
                     SLICE: tl.constexpr, HAS_ZERO: tl.constexpr):
    """_run_scales' loads: each row's eight scales and zero points of the run at k0 where a group is one
    slice, else the one group's."""
    if GROUP == SLICE:
        g3 = k0 // GROUP + tl.arange(0, 8)[None, None, :]
    else:
        g3 = k0 // GROUP + tl.zeros((1, 1, 1), dtype=tl.int32)
    s = tl.load(scale_ptr + rows3 * stride_sn + g3, mask=row_mask3, other=0.0).to(tl.float32)
    z = s
    if HAS_ZERO:
        z = tl.load(zero_ptr + rows3 * stride_sn + g3, mask=row_mask3, other=0).to(tl.float32)
    return s, z


@triton.jit
def _split_run_scales(s, z, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr):
    """The eight slices' scales and the values their nibbles are stored above, from _load_run_scales'."""
    if GROUP == SLICE:
        scales = _eighths(s)
        offsets = (8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0)
        if HAS_ZERO:
            offsets = _eighths(z + 8.0)
    else:
        scales = (s, s, s, s, s, s, s, s)
        offset = 8.0
        if HAS_ZERO:
            offset = z + 8.0
        offsets = (offset, offset, offset, offset, offset, offset, offset, offset)
    return scales, offsets


@triton.jit
def _run_scales(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, k0, GROUP: tl.constexpr, SLICE: tl.constexpr,
                HAS_ZERO: tl.constexpr):
    """The eight slices' scales of the run at k0 and the values their nibbles are stored above, where
    the groups let them be read once a run: a group a slice (each row's eight scales in one load; the
    split to slices costs a small layout change in shared memory), or groups of whole runs (one
    value). Per slice they would be eight loads a row, each with its 64-bit address."""
    s, z = _load_run_scales(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, k0, GROUP, SLICE, HAS_ZERO)
    return _split_run_scales(s, z, GROUP, SLICE, HAS_ZERO)


@triton.jit
def _per_weight_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, rows3, row_mask3, ms3, m_mask3, ws3, rstd3,
                     k_lo, k_hi, K, stride_xm, stride_sn, GROUP: tl.constexpr, SLICE: tl.constexpr,
                     HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                     PRENORM: tl.constexpr):
    """The run loop with each weight scaled on its own: x * w accumulated element-wise, [M, N, S]."""
    RUN: tl.constexpr = 8 * SLICE
    acc = tl.zeros((BLOCK_M, BLOCK_N, SLICE), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, RUN):
        run_words = words
        # K is a whole number of runs: the next run's words, if any, in flight while this one is used.
        next_words = k0 // 8 + SLICE + ws3
        words = tl.load(w_rows + next_words, mask=row_mask3 & (next_words < K // 8), other=0)
        low, high = nibble_planes(run_words)
        below = 8388608.0
        for j in tl.static_range(8):
            x = fused_input(x_ptr, ms3, k0 + j * SLICE + ws3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED, PRENORM)
            s, offset = _scale_and_offset(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, (k0 + j * SLICE) // GROUP,
                                          HAS_ZERO)
            if j == 5:
                below = 8388608.0
            upto, place = nibble_times_place(low, high, j), 4 * (j % 5)
            # (nibble * 16^place) * (scale / 16^place) - (8 + zero) * scale: one subtraction, one FMA
            acc += x * ((upto - below) * (s * (1.0 / (1 << place))) - offset * s)
            below = upto
    return acc


@triton.jit
def _next_runs(w_rows, ws3, row_mask3, k0, K, ahead, SLICE: tl.constexpr, AHEAD: tl.constexpr):
    """While the run at k0 is used: request the words AHEAD runs on (K is a whole number of runs; past
    it, none), and return the next run's words and the run after it (AHEAD 2) or them again (AHEAD 1)."""
    later = k0 // 8 + AHEAD * SLICE + ws3
    loaded = tl.load(w_rows + later, mask=row_mask3 & (later < K // 8), other=0)
    if AHEAD == 2:
        return ahead, loaded
    return loaded, loaded


@triton.jit
def _quad_sums_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, rows3, row_mask3, ms3, m_mask3, ws3, rstd3,
                    k_lo, k_hi, K, stride_xm, stride_sn, GROUP: tl.constexpr, SLICE: tl.constexpr,
                    HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                    PRENORM: tl.constexpr, RUN_SCALES: tl.constexpr, ahead, AHEAD: tl.constexpr):
    """The run loop with a thread's four consecutive columns summed before their group's scale: per
    nibble, quad = sum of x n 16^p - (8 + zero) 16^p sum of x, then acc += quad * scale / 16^p. One
    mask, one subtraction and one FMA a weight; the scale and the offset once per four (the offset's
    x sum is shared by every row a thread holds). AHEAD: as _half_sums_loop's. Accumulates [M, N, S / 4]."""
    RUN: tl.constexpr = 8 * SLICE
    ONCE_A_RUN: tl.constexpr = RUN_SCALES and (GROUP == SLICE or GROUP % RUN == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N, SLICE // 4), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, RUN):
        w0, w1, w2, w3 = quarters(words)
        words, ahead = _next_runs(w_rows, ws3, row_mask3, k0, K, ahead, SLICE, AHEAD)
        low0, high0 = nibble_planes(w0)
        low1, high1 = nibble_planes(w1)
        low2, high2 = nibble_planes(w2)
        low3, high3 = nibble_planes(w3)
        below0, below1, below2, below3 = 8388608.0, 8388608.0, 8388608.0, 8388608.0
        if ONCE_A_RUN:
            scales, offsets = _run_scales(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, k0, GROUP, SLICE, HAS_ZERO)
        for j in tl.static_range(8):
            x = fused_input(x_ptr, ms3, k0 + j * SLICE + ws3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED, PRENORM)
            x0, x1, x2, x3 = quarters(x)
            if ONCE_A_RUN:
                s, offset = scales[j], offsets[j]
            else:
                s, offset = _scale_and_offset(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn,
                                              (k0 + j * SLICE) // GROUP, HAS_ZERO)
            if j == 5:
                below0, below1, below2, below3 = 8388608.0, 8388608.0, 8388608.0, 8388608.0
            place = 1 << (4 * (j % 5))
            up0 = nibble_times_place(low0, high0, j)
            up1 = nibble_times_place(low1, high1, j)
            up2 = nibble_times_place(low2, high2, j)
            up3 = nibble_times_place(low3, high3, j)
            quad = (x0 + x1 + x2 + x3) * (-offset * place)
            quad += x0 * (up0 - below0)
            quad += x1 * (up1 - below1)
            quad += x2 * (up2 - below2)
            quad += x3 * (up3 - below3)
            acc += quad * (s * (1.0 / place))
            below0, below1, below2, below3 = up0, up1, up2, up3
    return acc


@triton.jit
def _half_pair(words, J: tl.constexpr):
    """Nibbles J and J + 4 of each word as fp16, 1024 + nibble each: the two nibbles land in the low
    bits of the word's two halves (one shift, one AND-OR), each half then fp16's bits of 1024 + n."""
    return fp16_halves(((words >> (4 * J)) & 0x000F000F) | 0x64006400)


@triton.jit
def _pair_sums(w0, w1, w2, w3, v0, v1, v2, v3, xa, xb, mult, offset_a, offset_b, J: tl.constexpr,
               PTX: tl.constexpr, HAS_ZERO: tl.constexpr, FP4: tl.constexpr = False):
    """Over a thread's four consecutive columns (the quarters of xa, xb: fp32 inputs [M, 1, S] of
    slices J and J + 4, each quarter times mult [M, 1, S / 4]): sum of (n - offset) x for nibble J of
    words w_i and for nibble J + 4, each summed in fp16 (offset_a, offset_b: 8 plus the zero point,
    subtracted from 1024 + n exactly in fp16), as fp32. v_i: the words shifted down by 8 (nibbles 2,
    3, 6, 7 where 0, 1, 4, 5 were). PTX: NVIDIA's packed fp16x2 arithmetic (platforms/cuda_device.py),
    two weights an instruction, where odd nibbles J come out 16 times larger (mult is then a
    sixteenth as large); else the same arithmetic in Triton (any backend, and the interpreter).
    FP4: the words hold e2m1 values (ops/fp4_weights.py), each coming out times 2^-14; no offsets."""
    a0, a1, a2, a3 = quarters(xa)
    b0, b1, b2, b3 = quarters(xb)
    a0, a1, a2, a3 = a0 * mult, a1 * mult, a2 * mult, a3 * mult
    b0, b1, b2, b3 = b0 * mult, b1 * mult, b2 * mult, b3 * mult
    if FP4:
        if PTX:
            return fp4_pair_sums(w0, w1, w2, w3, pack_half2(a0, b0), pack_half2(a1, b1), pack_half2(a2, b2),
                                 pack_half2(a3, b3), J)
        n0, m0 = fp4_halves(w0, J)
        n1, m1 = fp4_halves(w1, J)
        n2, m2 = fp4_halves(w2, J)
        n3, m3 = fp4_halves(w3, J)
        pa = n0 * a0.to(tl.float16) + n1 * a1.to(tl.float16) + n2 * a2.to(tl.float16) + n3 * a3.to(tl.float16)
        pb = m0 * b0.to(tl.float16) + m1 * b1.to(tl.float16) + m2 * b2.to(tl.float16) + m3 * b3.to(tl.float16)
        return pa.to(tl.float32), pb.to(tl.float32)
    if PTX:
        place = 16.0 if J % 2 == 1 else 1.0
        if HAS_ZERO:
            less = pack_half2(1024.0 + offset_a * place, 1024.0 + offset_b * place)
        else:  # fp16 1032 twice (1152 twice for odd nibbles)
            less = tl.full((1, 1, 1), 0x64806480 if J % 2 == 1 else 0x64086408, tl.int32)
        x0, x1, x2, x3 = pack_half2(a0, b0), pack_half2(a1, b1), pack_half2(a2, b2), pack_half2(a3, b3)
        if J < 2:
            return nibble_pair_sums(w0, w1, w2, w3, x0, x1, x2, x3, less, J % 2 == 1)
        return nibble_pair_sums(v0, v1, v2, v3, x0, x1, x2, x3, less, J % 2 == 1)
    less_a, less_b = 1032.0, 1032.0
    if HAS_ZERO:
        less_a, less_b = (1024.0 + offset_a).to(tl.float16), (1024.0 + offset_b).to(tl.float16)
    n0, m0 = _half_pair(w0, J)
    n1, m1 = _half_pair(w1, J)
    n2, m2 = _half_pair(w2, J)
    n3, m3 = _half_pair(w3, J)
    pa = ((n0 - less_a) * a0.to(tl.float16) + (n1 - less_a) * a1.to(tl.float16)
          + (n2 - less_a) * a2.to(tl.float16) + (n3 - less_a) * a3.to(tl.float16))
    pb = ((m0 - less_b) * b0.to(tl.float16) + (m1 - less_b) * b1.to(tl.float16)
          + (m2 - less_b) * b2.to(tl.float16) + (m3 - less_b) * b3.to(tl.float16))
    return pa.to(tl.float32), pb.to(tl.float32)


@triton.jit
def _power_of_two_bits(biased):
    """The fp32 with this biased exponent (1..254) and a zero mantissa: 2^(biased - 127), exact."""
    return (biased << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quad_range(x):
    """Each thread's largest |x| over its four consecutive columns of x [M, 1, S] -> [M, 1, S / 4]."""
    x0, x1, x2, x3 = quarters(x)
    return tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))


@triton.jit
def _run_raw(x_ptr, norm_w_ptr, ms3, m_mask3, ws3, k0, stride_xm, SLICE: tl.constexpr, PRENORM: tl.constexpr):
    """ops/gemv.raw_input for the eight slices of the run at k0."""
    return (raw_input(x_ptr, norm_w_ptr, ms3, k0 + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 2 * SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 3 * SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 4 * SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 5 * SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 6 * SLICE + ws3, m_mask3, stride_xm, PRENORM),
            raw_input(x_ptr, norm_w_ptr, ms3, k0 + 7 * SLICE + ws3, m_mask3, stride_xm, PRENORM))


@triton.jit
def _fp4_run_scales(scale_ptr, rows3, row_mask3, ws3, stride_sn, k0, GROUP: tl.constexpr, SLICE: tl.constexpr,
                    E8M0: tl.constexpr):
    """The scales of each thread's four consecutive columns in the run at k0's eight slices, [1, N, S / 4]
    each, loaded in the words' own [1, N, S] shape and split as they are (quarters), so they come in
    the layout of the pair sums (Triton 3.6 gave scales loaded in a shape of their own a round trip
    through shared memory each: 1,034 instructions a trip against 527 without scales). Where slices hold
    whole groups (ops/fp4_weights.py's run-major order) a thread's four columns load their group's
    eight bytes of the run as four 16-bit pairs, slices 2 i and 2 i + 1 in pair i; else each of the four
    loads slice i's byte, and slice i + 4's from a second load."""
    row = rows3 * stride_sn
    within = ws3 % 4
    if SLICE % GROUP == 0:
        T: tl.constexpr = SLICE // GROUP
        pairs = scale_ptr.to(tl.pointer_type(tl.int16))
        at = (row + (k0 // (8 * SLICE)) * (8 * T)) // 2 + (ws3 // GROUP) * 4 + within
        p0, p1, p2, p3 = quarters(tl.load(pairs + at, mask=row_mask3, other=0).to(tl.int32))
        return (scale_in_word(p0, 0, E8M0), scale_in_word(p0, 1, E8M0), scale_in_word(p1, 0, E8M0),
                scale_in_word(p1, 1, E8M0), scale_in_word(p2, 0, E8M0), scale_in_word(p2, 1, E8M0),
                scale_in_word(p3, 0, E8M0), scale_in_word(p3, 1, E8M0))
    # (a slice lies in one group here)
    s0, s1, s2, s3 = quarters(group_scales(scale_ptr, row + (k0 + within * SLICE) // GROUP, row_mask3, E8M0))
    s4, s5, s6, s7 = quarters(group_scales(scale_ptr, row + (k0 + (within + 4) * SLICE) // GROUP, row_mask3, E8M0))
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _half_sums_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, ahead, rows3, row_mask3, ms3, m_mask3, ws3,
                    rstd3, k_lo, k_hi, K, stride_xm, stride_sn, GROUP: tl.constexpr, SLICE: tl.constexpr,
                    HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRENORM: tl.constexpr,
                    RUN_SCALES: tl.constexpr, PTX: tl.constexpr, AHEAD: tl.constexpr, FP4: tl.constexpr = False,
                    E8M0: tl.constexpr = False):
    """The quad-sum loop in 16-bit pairs: a word's nibbles j and j + 4 become fp16 1024 + n in its two
    halves with one AND-OR, the nibble less 8 is one exact fp16 subtraction, and a thread's four
    consecutive columns of a slice are summed in fp16 before the group's scale in fp32. Each thread
    brings its run's 32 inputs to (256, 512] by a power of two of its own (no pass over x first, no
    exchange between threads), which keeps those fp16 sums far below overflow and small inputs at
    fp16's precision relative to the largest; a run's sums are scaled back once. AHEAD: runs of
    words in flight beyond the one in use (1, or 2 with `ahead` the second). FP4: e2m1 values
    (ops/fp4_weights.py) with a scale byte per group of GROUP columns (E8M0 exponents or FP8 e4m3), read
    for each thread's four columns (_fp4_run_scales); the values come out times 2^-14, so the inputs are
    brought to [2^14, 2^15) instead. Accumulates [M, N, S / 4]."""
    RUN: tl.constexpr = 8 * SLICE
    ONCE_A_RUN: tl.constexpr = RUN_SCALES and not FP4 and (GROUP == SLICE or GROUP % RUN == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N, SLICE // 4), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, RUN):
        w0, w1, w2, w3 = quarters(words)
        v0, v1, v2, v3 = w0 >> 8, w1 >> 8, w2 >> 8, w3 >> 8
        words, ahead = _next_runs(w_rows, ws3, row_mask3, k0, K, ahead, SLICE, AHEAD)
        raw = _run_raw(x_ptr, norm_w_ptr, ms3, m_mask3, ws3, k0, stride_xm, SLICE, PRENORM)
        if ONCE_A_RUN:
            scales, offsets = _run_scales(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn, k0, GROUP, SLICE, HAS_ZERO)
        xs = (formed_input(*raw[0], rstd3, PRENORM), formed_input(*raw[1], rstd3, PRENORM),
              formed_input(*raw[2], rstd3, PRENORM), formed_input(*raw[3], rstd3, PRENORM),
              formed_input(*raw[4], rstd3, PRENORM), formed_input(*raw[5], rstd3, PRENORM),
              formed_input(*raw[6], rstd3, PRENORM), formed_input(*raw[7], rstd3, PRENORM))
        largest = tl.maximum(tl.maximum(tl.maximum(_quad_range(xs[0]), _quad_range(xs[1])),
                                        tl.maximum(_quad_range(xs[2]), _quad_range(xs[3]))),
                             tl.maximum(tl.maximum(_quad_range(xs[4]), _quad_range(xs[5])),
                                        tl.maximum(_quad_range(xs[6]), _quad_range(xs[7]))))
        # largest in [2^(e - 127), 2^(e - 126)) times 2^(135 - e): in [256, 512); e at least 9 (inputs of
        # all zeros or below 2^-118 take 2^126), so the inverse 2^(e - 135) is a normal float too.
        e = tl.maximum((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF, 9)
        x_mult, x_mult16 = _power_of_two_bits(262 - e), _power_of_two_bits(258 - e)
        back = _power_of_two_bits(e - 8)
        if FP4:  # largest to [2^14, 2^15) (e at least 15); the values' 2^-14 undone as the sums come back
            e = tl.maximum(e, 15)
            x_mult = _power_of_two_bits(268 - e)
            back = _power_of_two_bits(e)
        run = tl.zeros((BLOCK_M, BLOCK_N, SLICE // 4), dtype=tl.float32)
        if FP4:
            fp4_scales = _fp4_run_scales(scale_ptr, rows3, row_mask3, ws3, stride_sn, k0, GROUP, SLICE, E8M0)
        for j in tl.static_range(4):
            # NVIDIA's loop reads nibbles 1 and 3 of a byte 16 times larger: their inputs a sixteenth as large
            mult = x_mult16 if PTX and j % 2 == 1 and not FP4 else x_mult
            if FP4:
                sa, sb, offset_a, offset_b = fp4_scales[j], fp4_scales[j + 4], 0.0, 0.0
            elif ONCE_A_RUN:
                sa, offset_a, sb, offset_b = scales[j], offsets[j], scales[j + 4], offsets[j + 4]
            else:
                sa, offset_a = _scale_and_offset(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn,
                                                 (k0 + j * SLICE) // GROUP, HAS_ZERO)
                sb, offset_b = _scale_and_offset(scale_ptr, zero_ptr, rows3, row_mask3, stride_sn,
                                                 (k0 + (j + 4) * SLICE) // GROUP, HAS_ZERO)
            pa, pb = _pair_sums(w0, w1, w2, w3, v0, v1, v2, v3, xs[j], xs[j + 4], mult, offset_a, offset_b, j, PTX,
                                HAS_ZERO, FP4)
            run += pa * sa
            run += pb * sb
        acc += run * back
    return acc


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                      stride_ym, stride_sn, eps, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATED: tl.constexpr,
                      PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr,
                      part_ptr, counter_ptr, k_per_split, SPLITS: tl.constexpr, QUAD_SUMS: tl.constexpr,
                      ACTIVATE: tl.constexpr, RUN_SCALES: tl.constexpr, HALF_SUMS: tl.constexpr = False,
                      PTX: tl.constexpr = False, AHEAD: tl.constexpr = 1, FP4: tl.constexpr = False,
                      E8M0: tl.constexpr = False):
    """SPLITS > 1: programs over parts of K too (program_id(1)); each stores its fp32 sums in its own
    [M, N] plane of part_ptr and counts itself in counter_ptr[program_id(0)]; the part that counts
    last adds the planes, finishes the output as one program would, and sets the count back to 0.
    FP4 (the fp16-pair loop only): e2m1 words, scale bytes, and zero_ptr holds each row's float32 scale."""
    # Every tensor is made in the accumulator's 3-D shape [rows of x, output features, slice] from
    # its pointers, so no value changes layout inside the loop.
    pid = tl.program_id(0)
    rows, row_mask, rows3, row_mask3, ms, ms3, m_mask3 = program_tile_3d(pid, M, N, BLOCK_M, BLOCK_N, ACTIVATE)
    ws3 = tl.arange(0, SLICE)[None, None, :]
    w_rows = w_ptr + rows3 * stride_wn
    RUN: tl.constexpr = 8 * SLICE
    k_lo, k_hi = 0, K
    if SPLITS > 1:
        k_lo = tl.program_id(1) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    # The first run's words (no kernel writes weights) are requested before waiting for x's producer.
    words = tl.load(w_rows + k_lo // 8 + ws3, mask=row_mask3, other=0)
    ahead = words
    if AHEAD == 2:
        second = k_lo // 8 + SLICE + ws3
        ahead = tl.load(w_rows + second, mask=row_mask3 & (second < k_hi // 8), other=0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd3 = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
    if PRENORM:
        sum_sq = tl.zeros((BLOCK_M, 1, 1), dtype=tl.float32)
        for k0 in range(0, K, RUN):  # wide chunks: few round trips
            kr = k0 + tl.arange(0, RUN)[None, None, :]
            xr = tl.load(x_ptr + ms3 * stride_xm + kr, mask=m_mask3, other=0.0).to(tl.float32)
            sum_sq += tl.sum(xr * xr, 2, keep_dims=True)
        rstd3 = 1.0 / tl.sqrt(sum_sq / K + eps)
    if HALF_SUMS:
        acc = _half_sums_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, ahead, rows3, row_mask3, ms3,
                              m_mask3, ws3, rstd3, k_lo, k_hi, K, stride_xm, stride_sn, GROUP, SLICE, HAS_ZERO,
                              BLOCK_M, BLOCK_N, PRENORM, RUN_SCALES, PTX, AHEAD, FP4, E8M0)
    elif QUAD_SUMS:
        acc = _quad_sums_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, rows3, row_mask3, ms3, m_mask3,
                              ws3, rstd3, k_lo, k_hi, K, stride_xm, stride_sn, GROUP, SLICE, HAS_ZERO, BLOCK_M,
                              BLOCK_N, GATED, PRENORM, RUN_SCALES, ahead, AHEAD)
    else:
        acc = _per_weight_loop(x_ptr, w_rows, scale_ptr, zero_ptr, norm_w_ptr, words, rows3, row_mask3, ms3, m_mask3,
                               ws3, rstd3, k_lo, k_hi, K, stride_xm, stride_sn, GROUP, SLICE, HAS_ZERO, BLOCK_M,
                               BLOCK_N, GATED, PRENORM)
    y_acc = tl.sum(acc, 2)
    if FP4:
        y_acc *= tl.load(zero_ptr + rows, mask=row_mask, other=0.0)[None, :]
    y_mask = (ms < M)[:, None] & row_mask[None, :]
    if SPLITS > 1:
        count, y_acc = add_parts(y_acc, part_ptr + ms[:, None] * N + rows[None, :], y_mask, counter_ptr + pid,
                                  M * N, tl.program_id(1), SPLITS)
        if count != SPLITS - 1:
            return
    finish_rows(y_acc, x_ptr, bias_ptr, y_ptr, ms, ms < M, rows, row_mask, stride_ym, pid, N, HAS_BIAS, ACTIVATE,
                ADD_TO_Y, BLOCK_M, BLOCK_N)


@triton.jit
def _xt_slice(x_ptr, ks, ms, m_mask, stride_xm, K, rstd, norm_w_ptr, GATED: tl.constexpr, PRENORM: tl.constexpr):
    """Input columns ks [S, 1] of rows ms [1, 16] (rows past M zero), transposed for the MMA, in x's
    dtype as ops.activation / ops.rms_norm would hand them to a matmul."""
    offs = ms * stride_xm + ks
    x = tl.load(x_ptr + offs, mask=m_mask, other=0.0)
    if GATED:
        return silu_times(x.to(tl.float32), tl.load(x_ptr + K + offs, mask=m_mask, other=0.0))
    if PRENORM:
        return rms_scaled(x.to(tl.float32), rstd, tl.load(norm_w_ptr + ks), x.dtype)
    return x


@triton.jit
def _int4_mma_run(acc, x_ptr, w_rows, scale_ptr, zero_ptr, rows, row_mask, k0, ms, m_mask, stride_xm, stride_sn, K,
                  rstd, norm_w_ptr, GROUP: tl.constexpr, SLICE: tl.constexpr, HAS_ZERO: tl.constexpr,
                  GATED: tl.constexpr, PRENORM: tl.constexpr):
    """_int4_gemv_mma_kernel's run at k0 over 4-bit integers: acc + W x^T for its 8 SLICE columns."""
    ws = tl.arange(0, SLICE)
    dtype = x_ptr.dtype.element_ty
    run_words = tl.load(w_rows + (k0 // 8 + ws)[None, :], mask=row_mask[:, None], other=0)
    low, high = nibble_planes(run_words)
    below = 8388608.0
    for j in tl.static_range(8):
        if j == 5:
            below = 8388608.0
        upto, place = nibble_times_place(low, high, j), 4 * (j % 5)
        group = (k0 + j * SLICE) // GROUP
        s = tl.load(scale_ptr + rows * stride_sn + group, mask=row_mask, other=0.0)
        # (nibble - 8 - zero) * 16^place, exact, then times scale / 16^place (exact in any float)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + rows * stride_sn + group, mask=row_mask, other=0).to(tl.float32)
            q = upto - below - ((8.0 + zero) * (1 << place))[:, None]
        else:
            q = upto - (below + 8.0 * (1 << place))
        below = upto
        if dtype == tl.float16:  # 16^place would overflow fp16: unscaled first (in fp32, exact)
            w = (q * (1.0 / (1 << place))).to(dtype) * s.to(dtype)[:, None]
        else:
            w = q.to(dtype) * (s.to(tl.float32) * (1.0 / (1 << place))).to(dtype)[:, None]
        xt = _xt_slice(x_ptr, (k0 + j * SLICE + ws)[:, None], ms, m_mask, stride_xm, K, rstd, norm_w_ptr, GATED,
                       PRENORM)
        acc = tl.dot(w, xt, acc, input_precision="ieee" if dtype == tl.float32 else "tf32")
    return acc


# FP4 tensor-core runs take a slice this many columns at a time: the whole slice (128) spilled registers
# for sm_90 under Triton 3.6.
_FP4_MMA_WIDTH = tl.constexpr(64)


@triton.jit
def _fp4_mma_run(acc, x_ptr, w_rows, scale_ptr, rows, row_mask, k0, ms, m_mask, stride_xm, stride_sn, K, rstd,
                 norm_w_ptr, GROUP: tl.constexpr, SLICE: tl.constexpr, E8M0: tl.constexpr, GATED: tl.constexpr,
                 PRENORM: tl.constexpr):
    """_int4_gemv_mma_kernel's run at k0 over FP4 words, in parts of up to _FP4_MMA_WIDTH columns of each
    slice: each weight its value times its group's scale, rounded to x's dtype (exact: e2m1 times an FP8
    or a power of two), one dot a part; the row scale comes after the sums. A part's scales are read one
    a group and row and spread over the group's columns in registers (one dot a group, 64 a run of
    NVFP4, took 5,589 instructions a trip for sm_90)."""
    WIDTH: tl.constexpr = SLICE if SLICE < _FP4_MMA_WIDTH else _FP4_MMA_WIDTH
    T: tl.constexpr = max(1, WIDTH // GROUP)  # groups a part (one where the part lies in one group)
    ws = tl.arange(0, WIDTH)
    dtype = x_ptr.dtype.element_ty
    for t in tl.static_range(SLICE // WIDTH):
        words = tl.load(w_rows + (ws + (k0 // 8 + t * WIDTH))[None, :], mask=row_mask[:, None], other=0)
        for j in tl.static_range(8):
            first = k0 + j * SLICE + t * WIDTH
            groups = scale_offsets(first + tl.arange(0, T) * GROUP, GROUP, SLICE)
            s = group_scales(scale_ptr, rows[:, None] * stride_sn + groups[None, :], row_mask[:, None], E8M0)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (s.shape[0], T, WIDTH // T)), (s.shape[0], WIDTH))
            w = (fp4_value(words, j) * (s * 16384.0)).to(dtype)  # (values come out times 2^-14)
            xt = _xt_slice(x_ptr, (first + ws)[:, None], ms, m_mask, stride_xm, K, rstd, norm_w_ptr, GATED, PRENORM)
            acc = tl.dot(w, xt, acc, input_precision="ieee" if dtype == tl.float32 else "tf32")
    return acc


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_mma_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm,
                          stride_wn, stride_ym, stride_sn, eps, GROUP: tl.constexpr, SLICE: tl.constexpr,
                          HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          GATED: tl.constexpr, PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr,
                          part_ptr, counter_ptr, k_per_split, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr = 16,
                          FP4: tl.constexpr = False, E8M0: tl.constexpr = False):
    """The same contract on the tensor cores: y^T [BLOCK_N, BLOCK_M] = W x^T for BLOCK_M rows of x
    (16 or 32: rows past M are zeros; more than MAX_ROWS through w4a16_mma_matmul, without fusions),
    with SPLITS > 1 over input features k_per_split at a time (program_id(2)) as _int4_gemv_kernel
    splits them (the part that counts last adds the others' fp32 planes and finishes the output),
    the weights dequantized in registers as the MMA's first operand. Nibbles come out of a word by
    masking under the exponent of 2^23 (the word's low 20 bits, then its high 12): float j minus
    float j - 1 is nibble j times 16^j exactly, so one mask and one subtraction a weight, no shifts;
    the power of 16 is folded into the group's scale. Weights are rounded to x's dtype as the
    dequantized reference rounds them. FP4: e2m1 words (ops/fp4_weights.py), each weight its value times
    its group's scale byte; zero_ptr holds each row's float32 scale, applied to the sums."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    ms = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M))[None, :]
    m_mask = ms < M
    RUN: tl.constexpr = 8 * SLICE
    launch.wait_for_previous_kernel(USE_PDL)
    rstd = tl.zeros((1, BLOCK_M), dtype=tl.float32)
    if PRENORM:
        CHUNK: tl.constexpr = 256
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, CHUNK):
            kc = k0 + tl.arange(0, CHUNK)[:, None]
            xc = tl.load(x_ptr + ms * stride_xm + kc, mask=m_mask & (kc < K), other=0.0).to(tl.float32)
            sum_sq += tl.sum(xc * xc, 0)
        rstd = (1.0 / tl.sqrt(sum_sq / K + eps))[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo, k_hi = 0, K
    if SPLITS > 1:
        k_lo = tl.program_id(2) * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, RUN):
        if FP4:
            acc = _fp4_mma_run(acc, x_ptr, w_rows, scale_ptr, rows, row_mask, k0, ms, m_mask, stride_xm, stride_sn, K,
                               rstd, norm_w_ptr, GROUP, SLICE, E8M0, GATED, PRENORM)
        else:
            acc = _int4_mma_run(acc, x_ptr, w_rows, scale_ptr, zero_ptr, rows, row_mask, k0, ms, m_mask, stride_xm,
                                stride_sn, K, rstd, norm_w_ptr, GROUP, SLICE, HAS_ZERO, GATED, PRENORM)
    if SPLITS > 1:
        tile = pid + tl.program_id(1) * tl.num_programs(0)
        count, acc = add_parts(acc, part_ptr + ms * N + rows[:, None], m_mask & row_mask[:, None],
                                counter_ptr + tile, M * N, tl.program_id(2), SPLITS)
        if count != SPLITS - 1:
            return
    if FP4:
        acc *= tl.load(zero_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + ms * stride_ym + rows[:, None]
    y_mask = m_mask & row_mask[:, None]
    y = acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)  # rounded as the model's dtype rounds
    if ADD_TO_Y:
        y = y + tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, y, mask=y_mask)


def int4_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None,
              group: int, slice_width: int, y: torch.Tensor, bias: torch.Tensor | None, gated: bool,
              norm_weight: torch.Tensor | None, eps: float, add_to_y: bool, config: dict | None,
              activate: bool = False, fp4: str | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launched by ops.gemv.gemv, which has checked the shapes; writes (or adds to) y [M, N], or with
    activate silu(gate) * up of the [gate, up] halves of N into y [M, N / 2]. fp4 ("e4m3" or "e8m0"):
    the words hold FP4 e2m1 values with scale bytes of that kind and row_scale [N] (ops/fp4_weights.py),
    run by the fp16-pair loop (sums in fp16 for any input dtype) or the tensor-core kernel."""
    m, n, k = x.shape[0], weight.shape[0], weight.shape[1] * 8
    if fp4:
        check_fp4_layout(weight, weight_scale, row_scale, group, slice_width, "gemv")
        weight_zero = row_scale  # (the kernels read each row's scale where zero points would be)
    elif slice_width < 2 or k % (8 * slice_width) or group % slice_width:
        raise ValueError(f"gemv: 4-bit words interleaved in slices of {slice_width} do not tile {k} input features "
                         f"in groups of {group}")
    block_m = max(1, triton.next_power_of_2(m))
    cfg = config or (INT4_GEMV_CONFIG if INT4_GEMV_CONFIG.get("mma")  # rows are padded to 16 there anyway
                     else dict(INT4_GEMV_CONFIG, block_n=max(4, INT4_GEMV_CONFIG["block_n"] // block_m)))
    min_programs = 0 if cfg.get("mma") else cfg.get("min_programs", 0)
    args = (x, weight, weight_scale, weight_zero if weight_zero is not None else weight_scale,
            bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
            m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), eps)
    flags = dict(GROUP=group, SLICE=slice_width, HAS_ZERO=weight_zero is not None and not fp4,
                 HAS_BIAS=bias is not None, BLOCK_N=cfg["block_n"], GATED=gated, PRENORM=norm_weight is not None,
                 ADD_TO_Y=add_to_y, FP4=bool(fp4), E8M0=fp4 == "e8m0", num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    if cfg.get("mma"):
        if cfg["block_n"] < 16 or slice_width < 16 or activate:
            raise ValueError("gemv: the tensor-core 4-bit kernel takes blocks of at least 16 features and slices of 16, "
                             "and no activation out")
        _, no_split = split_launch(1, k, k, m, n, 0, y)
        _int4_gemv_mma_kernel[(triton.cdiv(n, cfg["block_n"]),)](*args, **no_split, **flags)
    else:
        tiles = triton.cdiv(n, cfg["block_n"])
        parts, split = split_launch(tiles, 8 * slice_width, k, m, n, 0 if fp4 else min_programs, y)
        # Not for a gated input (down got slower with it: 29 -> 44 us on an H200) nor for a split launch
        # (the fp32 loop compiled to 32 registers and 1,162 spilled there; the fp16-pair loop with the norm
        # folded in spilled 82 and took 4x as long, benchmarks/results/2026-12-03b-h200-w4a16-half-sums.md).
        quad_sums = (cfg.get("quad_sums", INT4_GEMV_CONFIG["quad_sums"]) and slice_width % 4 == 0 and not gated
                     and parts == 1)
        ptx = cfg.get("ptx")
        ptx = ptx_arch() >= 80 if ptx is None else ptx  # fp16x2 FMA and cvt.rn.f16x2.f32
        half_sums = cfg.get("half_sums", INT4_GEMV_CONFIG["half_sums"])
        # By default where PTX runs it; never for fp32 inputs, whose model asks for more than fp16's precision.
        half_sums = quad_sums and x.dtype != torch.float32 and (ptx if half_sums is None else half_sums)
        if fp4:  # FP4 values have the fp16-pair loop only
            if not quad_sums:
                raise ValueError("gemv: FP4 weights take a plain (not gated) input and slices of a multiple of 4")
            half_sums = True
        ahead = cfg.get("ahead", INT4_GEMV_CONFIG["ahead"]) or (2 if half_sums else 1)
        _int4_gemv_kernel[(tiles, parts)](*args, BLOCK_M=block_m, QUAD_SUMS=quad_sums, HALF_SUMS=half_sums,
                                          PTX=half_sums and ptx, AHEAD=ahead if quad_sums else 1,
                                          ACTIVATE=activate,
                                          RUN_SCALES=cfg.get("run_scales", INT4_GEMV_CONFIG["run_scales"]), **split,
                                          **flags)
    return y


def w4a16_mma_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     weight_zero: torch.Tensor | None, group: int, slice_width: int,
                     config: dict | None = None, num_sms: int | None = None, split_k: int = 1,
                     fp4: str | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ the 4-bit weight [N, K / 8] (interleaved words, scales and zero points [N, K / group])
    -> [M, N] in x's dtype, on the tensor cores for any M: rows in tiles of 16 or 32, each tile reading
    the packed words once. W4A16 layers take it for 2 to 32 rows (w4a16.py). num_sms: the platform's
    compute units (num_compute_units), which the tile width follows. split_k: programs over parts of
    the input features too, the last part of a tile adding the others' fp32 sums (1: none; 0: as many
    parts as bring the programs to twice the compute units, where num_sms is known). fp4, row_scale: FP4
    words and scale bytes, as int4_gemv takes them."""
    m, k = x.shape
    n = weight.shape[0]
    if fp4:
        check_fp4_layout(weight, weight_scale, row_scale, group, slice_width, "w4a16")
        weight_zero = row_scale
    else:
        check_int4_layout(weight, weight_scale, group, slice_width, "w4a16")
    if weight.dtype != torch.int32 or weight.shape[1] * 8 != k or slice_width < 16:
        raise ValueError(f"w4a16: x {tuple(x.shape)}, packed {tuple(weight.shape)} {weight.dtype} and slices of "
                         f"{slice_width} (16 at least) do not fit")
    block_m = min(32, max(16, triton.next_power_of_2(m)))  # 64 rows at 2 stages: 288 KB of shared memory
    # 64 features a program, except for 16-row tiles where that leaves processors without a program:
    # on an H200 (132) a 4096-wide down projection took 56-57 us at 32 against 63-68 at 64 for 1 to 16
    # rows, but 95 against 68 at 32 rows (benchmarks/results/2026-12-01-h200-w4a16-rows.md).
    wide = num_sms is None or block_m > 16 or triton.cdiv(n, 64) >= num_sms
    cfg = config or {"block_n": 64 if wide else 32, "num_warps": 4, "num_stages": 2}
    x = x.contiguous()
    weight_scale = weight_scale.contiguous()
    grid = (triton.cdiv(n, cfg["block_n"]), triton.cdiv(m, block_m))
    tiles = grid[0] * grid[1]
    min_programs = split_k * tiles if split_k else 2 * num_sms if num_sms else 0
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    parts, split = split_launch(tiles, 8 * slice_width, k, m, n, min_programs, y)
    _int4_gemv_mma_kernel[grid + (parts,)](
        x, weight, weight_scale, weight_zero.contiguous() if weight_zero is not None else weight_scale, x, x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), weight_scale.stride(0), 0.0,
        GROUP=group, SLICE=slice_width, HAS_ZERO=weight_zero is not None and not fp4, HAS_BIAS=False,
        BLOCK_N=cfg["block_n"], GATED=False, PRENORM=False, ADD_TO_Y=False, USE_PDL=False, BLOCK_M=block_m,
        FP4=bool(fp4), E8M0=fp4 == "e8m0", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **split)
    return y
