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
