"""The 4-bit table matmul (ops/gemv_lut4.py, bitsandbytes NF4) at Qwen3-8B's layer shapes, as a decode step
runs it: 36 layers' distinct weights, every call in a CUDA graph, on the GPU. Beside it the path it
replaces (the weight expanded for the library GEMM) and bf16 weights through the library GEMM.

  python benchmarks/experiments/time_lut4_gemv.py [--rows 1,2,4,8,16] [--tiles] [--out result.json]

Prints milliseconds for the step's 144 matmuls per row count, and (--tiles) a tile sweep at 1, 2 and 4 rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from graph_int4_one_row import graph_us  # noqa: E402
from tune_int4_gemv import LAYERS, SHAPES  # noqa: E402

from sageinfer.layers.quantization.bnb4 import BLOCK, NF4  # noqa: E402
from sageinfer.ops.gemv_lut4 import LUT4_GEMV_MAX_ROWS, lut4_gemv  # noqa: E402
from sageinfer.ops.lut4_weights import lut4_expand, lut4_expand_kernel  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--tiles", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    table = NF4.to(dev)
    torch.manual_seed(0)
    layers = {}
    for name, (n, k) in SHAPES.items():
        layers[name] = []
        for _ in range(LAYERS):
            codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
            absmax = torch.rand(n, k // BLOCK, device=dev) * 0.05 + 0.01
            layers[name].append((codes, absmax))
    # Correctness first: the kernel against the expanded weight on one layer of each shape.
    errors = {}
    for name, (n, k) in SHAPES.items():
        codes, absmax = layers[name][0]
        dense = lut4_expand(codes, absmax, table, BLOCK, torch.float32)
        for m in (1, 3, LUT4_GEMV_MAX_ROWS):
            x = torch.randn(m, k, device=dev, dtype=dt)
            ref = x.float() @ dense.T
            got = lut4_gemv(x, codes, absmax, table, BLOCK).float()
            errors[f"{name} rows {m}"] = ((got - ref).abs().max() / ref.abs().max()).item()
    print("error against the expanded weight:", {key: f"{v:.1e}" for key, v in errors.items()}, flush=True)
    weight_bytes = sum(n * k // 2 + n * k // BLOCK * 4 for n, k in SHAPES.values()) * LAYERS
    result = {"errors": errors, "step_us": {}, "tiles": {}}

    def step(kind: str, m: int, tile=None) -> float:
        calls = []
        for i in range(LAYERS):
            for name, (n, k) in SHAPES.items():
                x = torch.randn(m, k, device=dev, dtype=dt)
                codes, absmax = layers[name][i]
                if kind == "kernel":
                    calls.append(lambda x=x, c=codes, a=absmax: lut4_gemv(x, c, a, table, BLOCK, tile))
                else:
                    calls.append(lambda x=x, c=codes, a=absmax: torch.nn.functional.linear(
                        x, lut4_expand_kernel(c, a, table, BLOCK, dt)))
        return graph_us(calls)

    for m in [int(r) for r in args.rows.split(",")]:
        row = {}
        if m <= LUT4_GEMV_MAX_ROWS:
            row["kernel"] = step("kernel", m)
        row["expand + GEMM"] = step("expand", m)
        result["step_us"][m] = row
        print(f"rows {m:3d}: " + "  ".join(f"{key} {us / 1e3:.3f} ms" for key, us in row.items())
              + (f"  (kernel {weight_bytes / row['kernel'] / 1e6:.2f} TB/s)" if "kernel" in row else ""), flush=True)
    if args.tiles:
        for m, tiles in ((1, ((8, 8, 4, 0), (8, 8, 4, 1), (8, 4, 4, 1), (8, 16, 4, 1), (4, 16, 4, 1), (16, 8, 8, 1))),
                         (2, ((16, 2, 4, 0), (8, 8, 4, 0), (8, 8, 4, 1), (8, 4, 4, 1))),
                         (4, ((8, 2, 4, 0), (8, 4, 4, 0), (8, 4, 4, 1), (4, 8, 4, 1)))):
            for tile in tiles:
                try:
                    us = step("kernel", m, tile)
                except Exception as exc:  # noqa: BLE001  (resources exceeded for this tile)
                    print(m, tile, "failed", type(exc).__name__, str(exc)[:160], flush=True)
                    continue
                result["tiles"][f"{m} rows {tile}"] = us
                print(f"{m} rows, tile (BLOCK_N, BLOCKS, warps, AHEAD) {tile}: {us / 1e3:.3f} ms "
                      f"{weight_bytes / us / 1e6:.2f} TB/s", flush=True)
    layers.clear()
    torch.cuda.empty_cache()
    dense = {name: [torch.randn(n, k, device=dev, dtype=dt) * 0.01 for _ in range(LAYERS)]
             for name, (n, k) in SHAPES.items()}
    calls = [lambda x=torch.randn(1, k, device=dev, dtype=dt), w=dense[name][i]: torch.nn.functional.linear(x, w)
             for i in range(LAYERS) for name, (n, k) in SHAPES.items()]
    result["bf16_one_row_us"] = graph_us(calls)
    print(f"bf16 weights, library GEMM, one row: {result['bf16_one_row_us'] / 1e3:.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
