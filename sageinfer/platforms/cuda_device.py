"""Triton device functions that only NVIDIA's Triton backend provides; kernels reach them behind a
constexpr the platform decides (see ops/launch.py), so other backends never compile them."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_grid_dependency_and_release_dependents():
    """Programmatic dependent launch (Hopper on): wait for the grid this one depends on, then let
    the next grid start launching."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pack_halves(lo, hi):
    """fp32 lo and hi as one int32 holding two fp16 (lo in the low half), in one instruction."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


# Four words' nibbles j and j + 4 sit at bits 4j and 16 + 4j: one AND-OR under fp16's exponent of 1024
# makes a pair of exact halves 1024 + n (j even: bits 0-3 of the word or of the word shifted by 8) or
# 1024 + 16 n (j odd); one subtraction or FMA makes n - 8; one FMA multiplies by the pair's inputs and
# adds. Outputs: per nibble j, the sum over the four words of (n_j - 8) * x_j, in fp32.
_FOUR_WORDS_DOT = tl.constexpr("""{
.reg .b32 t, q, top, a0, a1, a2, a3, c1032, c16th, cm72;
.reg .f16 lo, hi;
mov.b32 c1032, 0x64086408;
mov.b32 c16th, 0x2C002C00;
mov.b32 cm72, 0xD480D480;
""" + "".join(f"""shr.u32 top, ${8 + w}, 8;
lop3.b32 t, ${8 + w}, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 q, t, c1032;
{"mul.rn.f16x2 a0, q" if w == 0 else "fma.rn.f16x2 a0, q"}, ${12 + 4 * w}{"" if w == 0 else ", a0"};
lop3.b32 t, ${8 + w}, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 q, t, c16th, cm72;
{"mul.rn.f16x2 a1, q" if w == 0 else "fma.rn.f16x2 a1, q"}, ${13 + 4 * w}{"" if w == 0 else ", a1"};
lop3.b32 t, top, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 q, t, c1032;
{"mul.rn.f16x2 a2, q" if w == 0 else "fma.rn.f16x2 a2, q"}, ${14 + 4 * w}{"" if w == 0 else ", a2"};
lop3.b32 t, top, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 q, t, c16th, cm72;
{"mul.rn.f16x2 a3, q" if w == 0 else "fma.rn.f16x2 a3, q"}, ${15 + 4 * w}{"" if w == 0 else ", a3"};
""" for w in range(4)) + "".join(f"""mov.b32 {{lo, hi}}, a{p};
cvt.f32.f16 ${p}, lo;
cvt.f32.f16 ${p + 4}, hi;
""" for p in range(4)) + "}")


@triton.jit
def four_words_dot(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23,
                   x30, x31, x32, x33):
    """Nibbles of four int32 words times their inputs (xWP: word W's pair P, inputs of nibbles P and
    P + 4 as pack_halves made them), in fp16 pairs: eight fp32 sums, one per nibble."""
    return tl.inline_asm_elementwise(
        _FOUR_WORDS_DOT, "=f,=f,=f,=f,=f,=f,=f,=f" + ",r" * 20,
        [w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, x20, x21, x22, x23, x30, x31, x32, x33],
        dtype=(tl.float32,) * 8, is_pure=True, pack=1)
