"""Triton device functions that only NVIDIA's Triton backend provides; kernels reach them behind a
constexpr the platform decides (see ops/launch.py), so other backends never compile them."""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def ptx_arch() -> int:
    """The NVIDIA compute capability Triton compiles for here (e.g. 90); 0 on other backends and in the
    interpreter. Kernels take this module's inline PTX only where it is high enough."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no driver (a machine without a GPU)
        return 0
    return target.arch if target.backend == "cuda" and isinstance(target.arch, int) else 0


@triton.jit
def wait_grid_dependency_and_release_dependents():
    """Programmatic dependent launch (Hopper on): wait for the grid this one depends on, then let
    the next grid start launching."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


def _nibble_pair_sums_ptx(mask: str) -> str:
    """Four words' nibbles under `mask` (one in each 16-bit half) become fp16 1024 + n * place with one
    AND-OR, less the packed pair $10 (1024 + (8 + zero point) * place, exact), times their packed
    pair of inputs, summed in fp16x2; the two halves' sums out as fp32."""
    body = [".reg .b32 t, acc;", ".reg .b16 lo, hi;"]
    for i in range(4):
        body += [f"lop3.b32 t, ${2 + i}, {mask}, 0x64006400, 0xea;", "sub.f16x2 t, t, $10;",
                 f"mul.rn.f16x2 acc, t, ${6 + i};" if i == 0 else f"fma.rn.f16x2 acc, t, ${6 + i}, acc;"]
    body += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 $0, lo;", "cvt.f32.f16 $1, hi;"]
    return "{\n" + "\n".join(body) + "\n}"


# Nibbles 0 and 4 of a word (1024 + n), and nibbles 1 and 5 (1024 + 16 n).
_LOW_NIBBLE_PAIR_SUMS = tl.constexpr(_nibble_pair_sums_ptx("0x000F000F"))
_HIGH_NIBBLE_PAIR_SUMS = tl.constexpr(_nibble_pair_sums_ptx("0x00F000F0"))


@triton.jit
def pack_half2(low, high):
    """Two fp32 tensors rounded to fp16 and packed into one 32-bit word each (low in bits 0-15)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [low, high], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def nibble_pair_sums(w0, w1, w2, w3, x0, x1, x2, x3, less, HIGH: tl.constexpr):
    """For each element, sum over i of (n_i - offset) * x_i in fp16x2, where n_i are the two nibbles of
    word w_i at bits 0 and 16 (HIGH: bits 4 and 20, whose values come out 16 times larger), x_i their
    inputs packed as pack_half2 packs them and `less` the packed pair 1024 + offset (times 16 where
    HIGH); the two sums (low half's, high half's) as fp32. Eight weights in one shift-free AND-OR,
    one subtraction and one FMA a pair."""
    if HIGH:
        return tl.inline_asm_elementwise(_HIGH_NIBBLE_PAIR_SUMS, "=f,=f,r,r,r,r,r,r,r,r,r",
                                         [w0, w1, w2, w3, x0, x1, x2, x3, less], dtype=(tl.float32, tl.float32),
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_LOW_NIBBLE_PAIR_SUMS, "=f,=f,r,r,r,r,r,r,r,r,r",
                                     [w0, w1, w2, w3, x0, x1, x2, x3, less], dtype=(tl.float32, tl.float32),
                                     is_pure=True, pack=1)


# ops/fp4_weights.py's layout: the instructions that move value J and J + 4 of word $w to the fp16 bits of
# the value times 2^-14 in t (bits 9-11 of each half its magnitude, 15 its sign).
_FP4_VALUE_BITS = (
    ["shl.b32 t, {w}, 9;", "and.b32 t, t, 0x8E008E00;"],
    ["shl.b32 t, {w}, 6;", "shl.b32 u, {w}, 8;", "and.b32 u, u, 0x80008000;", "lop3.b32 t, t, 0x0E000E00, u, 0xea;"],
    ["shl.b32 t, {w}, 1;", "and.b32 t, t, 0x8E008E00;"],
    ["shr.b32 t, {w}, 2;", "and.b32 u, {w}, 0x80008000;", "lop3.b32 t, t, 0x0E000E00, u, 0xea;"],
)


def _fp4_pair_sums_ptx(j: int) -> str:
    """Four words' values J and J + 4 as fp16 (ops/fp4_weights.py's layout), times their packed pair of
    inputs, summed in fp16x2; the two halves' sums out as fp32."""
    body = [".reg .b32 t, u, acc;", ".reg .b16 lo, hi;"]
    for i in range(4):
        body += [line.format(w=f"${2 + i}") for line in _FP4_VALUE_BITS[j]]
        body.append(f"mul.rn.f16x2 acc, t, ${6 + i};" if i == 0 else f"fma.rn.f16x2 acc, t, ${6 + i}, acc;")
    body += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 $0, lo;", "cvt.f32.f16 $1, hi;"]
    return "{\n" + "\n".join(body) + "\n}"


_FP4_PAIR_SUMS_0 = tl.constexpr(_fp4_pair_sums_ptx(0))
_FP4_PAIR_SUMS_1 = tl.constexpr(_fp4_pair_sums_ptx(1))
_FP4_PAIR_SUMS_2 = tl.constexpr(_fp4_pair_sums_ptx(2))
_FP4_PAIR_SUMS_3 = tl.constexpr(_fp4_pair_sums_ptx(3))


@triton.jit
def fp4_pair_sums(w0, w1, w2, w3, x0, x1, x2, x3, J: tl.constexpr):
    """For each element, sum over i of v_i * x_i in fp16x2, where v_i are values J and J + 4 of word w_i
    in ops/fp4_weights.py's layout (each the e2m1 value times 2^-14) and x_i their inputs packed as
    pack_half2 packs them; the two sums (value J's, value J + 4's) as fp32."""
    args = [w0, w1, w2, w3, x0, x1, x2, x3]
    if J == 0:
        return tl.inline_asm_elementwise(_FP4_PAIR_SUMS_0, "=f,=f,r,r,r,r,r,r,r,r", args,
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    if J == 1:
        return tl.inline_asm_elementwise(_FP4_PAIR_SUMS_1, "=f,=f,r,r,r,r,r,r,r,r", args,
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    if J == 2:
        return tl.inline_asm_elementwise(_FP4_PAIR_SUMS_2, "=f,=f,r,r,r,r,r,r,r,r", args,
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_FP4_PAIR_SUMS_3, "=f,=f,r,r,r,r,r,r,r,r", args,
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


def _word_values_ptx(pairs: list[str]) -> str:
    """Inline PTX for a word's four values as fp32 ($0-$3 from the word $4): `pairs` leave the values as
    two fp16x2 registers p (values 0, 1) and q (values 2, 3), each half then widened."""
    body = [".reg .b32 u, p, q, c;", ".reg .b16 lo, hi, a, b;"] + pairs
    body += ["mov.b32 {a, b}, p;", "cvt.f32.f16 $0, a;", "cvt.f32.f16 $1, b;",
             "mov.b32 {a, b}, q;", "cvt.f32.f16 $2, a;", "cvt.f32.f16 $3, b;"]
    return "{\n" + "\n".join(body) + "\n}"


# e4m3 bytes: two packed e4m3 -> fp16x2 conversions (sm_89 on).
_E4M3_WORD_VALUES = tl.constexpr(_word_values_ptx(
    ["mov.b32 {lo, hi}, $4;", "cvt.rn.f16x2.e4m3x2 p, lo;", "cvt.rn.f16x2.e4m3x2 q, hi;"]))
# INT8 bytes: the word's sign bits flipped (n + 128, unsigned), two bytes at a time placed under fp16's
# 1024 (0x64: 1024 + n + 128, exact), 1152 subtracted in pairs.
_INT8_WORD_VALUES = tl.constexpr(_word_values_ptx(
    ["xor.b32 u, $4, 0x80808080;", "mov.b32 c, 0x64806480;", "prmt.b32 p, u, 0x64646464, 0x5140;",
     "prmt.b32 q, u, 0x64646464, 0x5342;", "sub.f16x2 p, p, c;", "sub.f16x2 q, q, c;"]))


@triton.jit
def e4m3_word_values(words):
    """The four FP8 e4m3 values packed in each int32 word (byte i -> value i) as fp32, exactly: two
    pairs an instruction where Triton's own conversion regroups bytes of different words first."""
    return tl.inline_asm_elementwise(_E4M3_WORD_VALUES, "=f,=f,=f,=f,r", [words],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def int8_word_values(words):
    """The four INT8 values packed in each int32 word (byte i -> value i) as fp32, exactly, two at a time
    through fp16 pairs (no I2F, no per-byte sign extension)."""
    return tl.inline_asm_elementwise(_INT8_WORD_VALUES, "=f,=f,=f,=f,r", [words],
                                     dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
