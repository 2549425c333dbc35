"""The per-row kernels that write a W8A8 layer's 8-bit inputs (ops/quantize.py, ops/quantize_fused.py) at
Qwen3-8B widths, in launch variants: how a row is split (whole in registers or blocks read twice), warps,
and how each element's quotient by its row's scale is taken (an IEEE division each, a product with the
row's inverse, or that product corrected by fma) and rounded to e4m3 (by hand or by the cast). Beside them,
what the card's memory allows (a copy of as many bytes), and whether the cast rounds as torch's does.
Prints us a launch, GB/s of the bytes a launch must move, and whether the bits are production's.

  python benchmarks/experiments/time_row_kernels.py [--rows 492,2048,16384] [--out FILE.json]
  python benchmarks/experiments/time_row_kernels.py --after-gemm --rows 16384

On an H200 (2026-12-04g), the GEMM before SiLU-and-mul did not slow it (426.8 us after it, 455.6 alone, 16,384
rows), and the variant over 3 blocks of 4,096 columns took 314 us against the 16,384-wide
block's 418, with the same bits: production's form since (ops/quantize_fused.silu_launch), so "production"
below is that form.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.activation import silu_and_mul_row  # noqa: E402
from sageinfer.ops.quantize import (_round_to_e4m3, quantize_rows_kernel, quotient,  # noqa: E402
                                    row_scale)
from sageinfer.ops.quantize_fused import rms_norm_quantize, silu_and_mul_quantize  # noqa: E402
from sageinfer.ops.rms_norm import normed_row  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 12288
QUOTIENTS = {0: "div_rn", 1: "inv_rn", 2: "inv_approx", 3: "fma"}


@triton.jit
def _to_fp8(y, amax, scale, half_range, QUOTIENT: tl.constexpr, HAND: tl.constexpr):
    """y on the e4m3 grid (fp32) over its row's scale. QUOTIENT: 0 y / scale by div_rn (ops/quantize.py),
    1 y times half_range / amax by div_rn once a row, 2 y times the approximate 1 / scale, 3 the product
    corrected twice by its remainder (ops/quantize.quotient: IEEE y / scale). HAND: rounded by
    ops/quantize._round_to_e4m3, else left to the cast."""
    if QUOTIENT == 0:
        q = tl.math.div_rn(y, scale)
    elif QUOTIENT == 1:
        q = y * tl.math.div_rn(half_range, tl.maximum(amax, 1e-12))
    elif QUOTIENT == 2:
        q = y * (1.0 / scale)
    else:
        q = quotient(y, scale, tl.math.div_rn(1.0, scale))
    q = tl.minimum(tl.maximum(q, -448.0), 448.0)
    if HAND:
        q = _round_to_e4m3(q)
    return q


@triton.jit
def _silu_quantize_variant(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, d, half_range, BLOCK: tl.constexpr,
                           WHOLE_ROW: tl.constexpr, QUOTIENT: tl.constexpr, HAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if WHOLE_ROW:
        cols = tl.arange(0, BLOCK)
        mask = cols < d
        y = silu_and_mul_row(x_row, cols, mask, d).to(tl.float32)
        amax = tl.max(tl.abs(y), axis=0)
        scale = row_scale(amax, half_range)
        tl.store(scale_ptr + row, scale)
        q = _to_fp8(y, amax, scale, half_range, QUOTIENT, HAND)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax_cols = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax_cols = tl.maximum(amax_cols, tl.abs(silu_and_mul_row(x_row, cols, cols < d, d).to(tl.float32)))
        amax = tl.max(amax_cols, axis=0)
        scale = row_scale(amax, half_range)
        tl.store(scale_ptr + row, scale)
        for start in range(0, d, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < d
            q = _to_fp8(silu_and_mul_row(x_row, cols, mask, d).to(tl.float32), amax, scale, half_range, QUOTIENT,
                        HAND)
            tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_variant(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, k, half_range, BLOCK: tl.constexpr,
                      QUOTIENT: tl.constexpr, HAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < k
    v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=0)
    scale = row_scale(amax, half_range)
    tl.store(scale_ptr + row, scale)
    q = _to_fp8(v, amax, scale, half_range, QUOTIENT, HAND)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_quantize_variant(x_ptr, residual_ptr, weight_ptr, q_ptr, scale_ptr, residual_out_ptr, stride_x, stride_r,
                           stride_q, hidden, eps, half_range, BLOCK: tl.constexpr, QUOTIENT: tl.constexpr,
                           HAND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    y = normed_row(x_ptr, residual_ptr, weight_ptr, residual_out_ptr, row, stride_x, stride_r, hidden, eps,
                   True, BLOCK).to(tl.float32)
    amax = tl.max(tl.abs(y), axis=0)
    scale = row_scale(amax, half_range)
    tl.store(scale_ptr + row, scale)
    q = _to_fp8(y, amax, scale, half_range, QUOTIENT, HAND)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < hidden)


@triton.jit
def _cast_kernel(x_ptr, hand_ptr, cast_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(hand_ptr + offs, _round_to_e4m3(x).to(hand_ptr.dtype.element_ty), mask=offs < n)
    tl.store(cast_ptr + offs, x.to(cast_ptr.dtype.element_ty), mask=offs < n)


def cast_check(dev) -> dict:
    """The cast to e4m3 against the rounding by hand and torch's cast, over values of every magnitude."""
    x = torch.cat([torch.randn(1 << 22, device=dev) * 10.0 ** torch.randint(-6, 3, (1 << 22,), device=dev),
                   torch.linspace(-0.03, 0.03, 1 << 20, device=dev)]).clamp(-448, 448)
    hand, cast = (torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=dev) for _ in range(2))
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, hand, cast, x.numel(), BLOCK=1024)
    ref = x.to(torch.float8_e4m3fn).view(torch.uint8)
    out = {}
    for name, got in (("hand", hand), ("cast", cast)):
        bad = (got.view(torch.uint8) != ref).nonzero().flatten()
        out[name] = {"differ": int(bad.numel()),
                     "examples": [(x[i].item(), got[i].float().item(), ref.view(torch.float8_e4m3fn)[i].float().item())
                                  for i in bad[:6]]}
        print(f"cast check: {name} differs from torch's cast in {bad.numel()} of {x.numel()}: {out[name]['examples']}")
    return out


def _time(fn, launches: int) -> float:
    return graph_time(lambda: [fn() for _ in range(launches)]) / launches * 1e6


def _sm_clock() -> str:
    """The SM clock now, as nvidia-smi reports it (MHz), or '?' where it cannot."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def after_gemm(rows: int, dev) -> dict:
    """SiLU-and-mul's quantization timed as a layer runs it, right after the FP8 gate_up GEMM that writes its
    input (a graph of 8 GEMMs, then of 8 GEMMs each followed by the kernel: the difference over 8), against
    the kernel alone: whether the GEMMs' power draw slows a kernel bound by its arithmetic."""
    x = torch.randn(rows, HIDDEN, device=dev).to(torch.float8_e4m3fn)
    w = torch.randn(2 * INTERMEDIATE, HIDDEN, device=dev).to(torch.float8_e4m3fn)
    x_scale = torch.full((rows, 1), 0.01, device=dev)
    w_scale = torch.full((1, 2 * INTERMEDIATE), 0.01, device=dev)
    gate_up = torch.empty(rows, 2 * INTERMEDIATE, device=dev, dtype=torch.bfloat16)

    def gemm():
        torch._scaled_mm(x, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16, out=gate_up)
    gemm()
    gemms = _time(gemm, 8)
    clock_gemm = _sm_clock()
    both = _time(lambda: (gemm(), silu_and_mul_quantize(gate_up, "fp8", 448.0)), 8)
    clock_both = _sm_clock()
    alone = _time(lambda: silu_and_mul_quantize(gate_up, "fp8", 448.0), 8)
    clock_alone = _sm_clock()
    out = {"rows": rows, "gemm_us": round(gemms, 1), "silu_after_gemm_us": round(both - gemms, 1),
           "silu_alone_us": round(alone, 1), "sm_clock_mhz": [clock_gemm, clock_both, clock_alone]}
    print(f"after gemm: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="492,2048,16384")
    parser.add_argument("--out", default=None)
    parser.add_argument("--after-gemm", action="store_true",
                        help="only SiLU-and-mul after the FP8 GEMM that writes its input, against it alone")
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    results = []
    if args.after_gemm:
        results = [after_gemm(int(r), dev) for r in args.rows.split(",")]
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(0), "after_gemm": results}, f, indent=1)
        return

    def record(kind, rows, variant, us, nbytes, ref=None, got=None):
        same = None if ref is None else bool(torch.equal(ref[0].view(torch.uint8), got[0][:rows].view(torch.uint8))
                                              and torch.equal(ref[1], got[1][:rows]))
        results.append({"kernel": kind, "rows": rows, "variant": variant, "us": round(us, 2),
                        "GB/s": round(nbytes / us / 1e3, 1), "same_bits": same})
        print(f"{kind:>10} rows {rows:>6} {variant:<34} {us:9.1f} us  {nbytes / us / 1e3:7.1f} GB/s"
              f"{'' if same is None else '  same bits' if same else '  DIFFERENT'}", flush=True)

    results.append({"cast_check": cast_check(dev)})
    for m in (int(r) for r in args.rows.split(",")):
        launches = 36 if m <= 2048 else 8
        gate_up = torch.randn(m, 2 * INTERMEDIATE, device=dev, dtype=dt)
        gate_up[:, :64] = -1000.0  # silu's -0.0
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        residual = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        weight = torch.rand(HIDDEN, device=dev, dtype=dt) + 0.5

        silu_bytes = m * 2 * INTERMEDIATE * 2 + m * INTERMEDIATE
        src = torch.empty(silu_bytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        record("copy", m, "torch copy_ (silu's bytes)", _time(lambda: dst.copy_(src), launches), silu_bytes)
        del src, dst

        ref = silu_and_mul_quantize(gate_up, "fp8", 448.0)
        record("silu", m, "production", _time(lambda: silu_and_mul_quantize(gate_up, "fp8", 448.0), launches),
               silu_bytes)
        q = torch.empty(m, INTERMEDIATE, dtype=torch.float8_e4m3fn, device=dev)
        s = torch.empty(m, 1, dtype=torch.float32, device=dev)
        for whole, block, warps in ((False, 2048, 4), (False, 4096, 8), (True, 16384, 16), (True, 16384, 32)):
            for quotient, hand in ((0, True), (1, True), (1, False), (2, False), (3, True), (3, False)):
                name = (f"{'whole' if whole else 'blocks'} {block}/{warps}w {QUOTIENTS[quotient]}"
                        f"{',hand' if hand else ''}")

                def run(whole=whole, block=block, warps=warps, quotient=quotient, hand=hand):
                    _silu_quantize_variant[(m,)](gate_up, q, s, gate_up.stride(0), q.stride(0), INTERMEDIATE, 448.0,
                                                 BLOCK=block, WHOLE_ROW=whole, QUOTIENT=quotient, HAND=hand,
                                                 num_warps=warps)
                us = _time(run, launches)
                run()
                record("silu", m, name, us, silu_bytes, ref, (q, s))
        del gate_up

        quant_bytes = m * HIDDEN * 3
        ref = quantize_rows_kernel(x, "fp8", 448.0)
        record("quantize", m, "production", _time(lambda: quantize_rows_kernel(x, "fp8", 448.0), launches),
               quant_bytes)
        q = torch.empty(m, HIDDEN, dtype=torch.float8_e4m3fn, device=dev)
        for warps in (4, 8):
            for quotient, hand in ((0, True), (1, True), (1, False), (2, False), (3, True), (3, False)):
                def run(warps=warps, quotient=quotient, hand=hand):
                    _quantize_variant[(m,)](x, q, s, x.stride(0), q.stride(0), HIDDEN, 448.0, BLOCK=4096,
                                            QUOTIENT=quotient, HAND=hand, num_warps=warps)
                us = _time(run, launches)
                run()
                record("quantize", m, f"whole 4096/{warps}w {QUOTIENTS[quotient]}{',hand' if hand else ''}", us,
                       quant_bytes, ref, (q, s))

        norm_bytes = m * HIDDEN * 2 * 3 + m * HIDDEN
        record("norm", m, "production (residual)",
               _time(lambda: rms_norm_quantize(x, weight, 1e-6, "fp8", 448.0, residual), launches), norm_bytes)
        ref = rms_norm_quantize(x, weight, 1e-6, "fp8", 448.0, residual)
        r_out = torch.empty_like(residual)
        for warps in (8, 16):
            for quotient, hand in ((0, True), (1, True), (1, False), (3, False)):
                def run(warps=warps, quotient=quotient, hand=hand):
                    _norm_quantize_variant[(m,)](x, residual, weight, q, s, r_out, x.stride(0), residual.stride(0),
                                                 q.stride(0), HIDDEN, 1e-6, 448.0, BLOCK=4096, QUOTIENT=quotient,
                                                 HAND=hand, num_warps=warps)
                us = _time(run, launches)
                run()
                record("norm", m, f"{warps}w {QUOTIENTS[quotient]}{',hand' if hand else ''}", us, norm_bytes,
                       ref, (q, s))
        del x, residual
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
