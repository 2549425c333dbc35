"""Whether Triton's warp specialization (a producer warp group feeding the tensor copies, consumer groups
running the MMAs) lifts the INT8 W8A8 descriptor kernel on Hopper toward the FP8 library GEMM. A layer's four
matmuls at Qwen3-8B shapes and T1's mixed-step rows, in one CUDA graph over distinct weights: the engine's
kernel (ops/int8_matmul.py, persistent, flattened loop) against a copy whose tile loop is warp-specialized,
in several tiles; torch._scaled_mm in FP8 at the same shapes as the ceiling to reach. Checks each variant
against the engine's kernel.

  python benchmarks/experiments/time_int8_ws.py [--rows 16000,2048] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.int8_matmul import GROUP_M, fast_config, grouped_tile, int8_matmul  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS = 4
# (block_m, block_n, block_k, warps, stages, warp_specialize, flatten)
VARIANTS = [(128, 256, 128, 8, 3, False, True), (128, 256, 128, 8, 3, True, False), (128, 256, 64, 8, 4, True, False),
            (128, 128, 128, 4, 4, True, False), (128, 128, 128, 8, 4, True, False), (128, 256, 128, 4, 3, True, False),
            (256, 128, 128, 8, 3, True, False), (128, 256, 128, 8, 3, False, False)]


@triton.jit(do_not_specialize=["m", "programs"])
def _int8_ws_kernel(x_desc, w_desc, y_desc, x_scale_ptr, w_scale_ptr, m, n, k, programs,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                    WS: tl.constexpr, FLATTEN: tl.constexpr):
    tiles = tl.cdiv(m, BLOCK_M) * tl.cdiv(n, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, programs, flatten=FLATTEN, warp_specialize=WS):
        row_tile, col_tile = grouped_tile(tile, m, n, BLOCK_M, BLOCK_N, GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for start in range(0, k, BLOCK_K):
            x = x_desc.load([row_tile * BLOCK_M, start])
            w = w_desc.load([col_tile * BLOCK_N, start])
            acc += tl.dot(x, w.T)
        rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        x_scale = tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < n, other=0.0)
        y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        y_desc.store([row_tile * BLOCK_M, col_tile * BLOCK_N], y.to(y_desc.dtype))


def ws_matmul(xq, x_scale, wq, w_scale, y, variant, sms):
    bm, bn, bk, warps, stages, ws, flatten = variant
    m, k = xq.shape
    n = wq.shape[0]
    programs = min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _int8_ws_kernel[(programs,)](
        TensorDescriptor.from_tensor(xq, [bm, bk]), TensorDescriptor.from_tensor(wq, [bn, bk]),
        TensorDescriptor.from_tensor(y, [bm, bn]), x_scale, w_scale, m, n, k, programs,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, WS=ws, FLATTEN=flatten, num_warps=warps, num_stages=stages)
    return y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="16000,2048")
    parser.add_argument("--out")
    args = parser.parse_args()
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "rows": []}
    print("| rows | path | ms a layer | TOP/s | max abs diff vs engine |")
    for m in (int(r) for r in args.rows.split(",")):
        flops = sum(2 * m * n * k for n, k in SHAPES.values())
        xs = {name: torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8) for name, (n, k) in SHAPES.items()}
        x_scale = torch.rand(m, device=dev) * 0.01
        layers = [{name: (torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8),
                          torch.rand(n, device=dev) * 0.01) for name, (n, k) in SHAPES.items()} for _ in range(LAYERS)]
        outs = {name: torch.empty(m, n, device=dev, dtype=torch.bfloat16) for name, (n, k) in SHAPES.items()}
        cfg = {**fast_config(m), "programs": sms} if fast_config(m).get("persistent") else fast_config(m)
        engine = {name: int8_matmul(xs[name], x_scale, w, s, torch.bfloat16, cfg) for name, (w, s) in layers[-1].items()}

        def timed(label, fn):
            try:
                fn()
                diff = max((outs[name].float() - engine[name].float()).abs().max().item() for name in SHAPES) \
                    if label.startswith("copy") else float("nan")
                ms = graph_time(fn) / LAYERS * 1e3
            except Exception as exc:  # noqa: BLE001  (a variant this compiler or device cannot build)
                print(f"| {m} | {label} | failed {type(exc).__name__}: {str(exc).splitlines()[0][:100]} |", flush=True)
                return
            print(f"| {m} | {label} | {ms:.3f} | {flops / (ms * 1e-3) / 1e12:.0f} | {diff:.3g} |", flush=True)
            result["rows"].append({"rows": m, "path": label, "ms": ms, "tops": flops / (ms * 1e-3) / 1e12,
                                   "diff": diff})

        def engine_path():
            for layer in layers:
                for name, (w, s) in layer.items():
                    int8_matmul(xs[name], x_scale, w, s, torch.bfloat16, cfg)
        timed(f"engine {cfg}", engine_path)
        for variant in VARIANTS:
            def run(variant=variant):
                for layer in layers:
                    for name, (w, s) in layer.items():
                        ws_matmul(xs[name], x_scale, w, s, outs[name], variant, sms)
            timed(f"copy {variant}", run)
        x8 = {name: x.to(torch.float8_e4m3fn) for name, x in xs.items()}
        w8 = [{name: w.to(torch.float8_e4m3fn) for name, (w, s) in layer.items()} for layer in layers]
        one = torch.ones((), device=dev)

        def fp8():
            for layer in w8:
                for name, w in layer.items():
                    torch._scaled_mm(x8[name], w.t(), one, one, out_dtype=torch.bfloat16)
        timed("fp8 _scaled_mm", fp8)
        xs = layers = outs = engine = x8 = w8 = None
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
