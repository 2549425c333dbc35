"""The library's 8-bit GEMMs (the platform's fp8_scaled_matmul and int8_matmul: cuBLAS on CUDA) of one layer's
four Qwen3-8B matmuls, row count by row count, each graph-timed over several layers' weights (more than L2
holds). Prints us per layer at each row count, and for each the fewest-microseconds row count at or above
it within +PAD_RANGE rows: where padding the rows would pay.

  python benchmarks/experiments/sweep_gemm_rows.py [--rows 8:768:8,1024:1280:32] [--kinds fp8,int8] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.platforms import get_platform  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS = 8
PAD_RANGE = 128


def weights_for(kind: str) -> list[dict]:
    dtype = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    out = []
    for _ in range(LAYERS):
        layer = {}
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda") * (0.05 if kind == "fp8" else 20)
            layer[name] = (w.to(dtype) if kind == "fp8" else w.round().clamp(-127, 127).to(dtype),
                           torch.rand(n, device="cuda") * 0.01 + 1e-3)
        out.append(layer)
    return out


def layer_us(kind: str, weights: list[dict], m: int, platform) -> dict:
    dtype = torch.float8_e4m3fn if kind == "fp8" else torch.int8
    inputs = {name: ((torch.randn(m, k, device="cuda") * (1 if kind == "fp8" else 20)).clamp(-127, 127).to(dtype),
                     torch.rand(m, 1, device="cuda") * 0.01) for name, (n, k) in SHAPES.items()}
    per = {}
    for name in SHAPES:
        def run(name=name):
            xq, xs = inputs[name]
            for layer in weights:
                wq, ws = layer[name]
                if kind == "fp8":
                    platform.fp8_scaled_matmul(xq, wq, xs, ws, torch.bfloat16)
                else:
                    platform.int8_matmul(xq, wq)
        per[name] = graph_time(run, reps=20 if m <= 2048 else 3) / LAYERS * 1e6
    per["layer"] = sum(per.values())
    return per


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="8:768:8", help="ranges start:stop:step (stop included), commas between")
    parser.add_argument("--kinds", default="fp8,int8")
    parser.add_argument("--out")
    args = parser.parse_args()
    counts = sorted({m for part in args.rows.split(",") for start, stop, step in [map(int, part.split(":"))]
                     for m in range(start, stop + 1, step)})
    platform = get_platform()
    result = {"device": torch.cuda.get_device_name(), "kinds": {}}
    for kind in args.kinds.split(","):
        weights = weights_for(kind)
        table = {m: layer_us(kind, weights, m, platform) for m in counts}
        result["kinds"][kind] = table
        print(f"== {kind}: us per layer (qkv, o, gate_up, down), and the best row count within +{PAD_RANGE}")
        for m, per in table.items():
            best = min((mm for mm in table if m <= mm <= m + PAD_RANGE), key=lambda mm: table[mm]["layer"])
            gain = per["layer"] / table[best]["layer"]
            parts = " ".join(f"{per[n]:6.1f}" for n in SHAPES)
            print(f"{kind} rows {m:4d} {per['layer']:7.1f} us  ({parts})  best at {best:4d}: "
                  f"{table[best]['layer']:7.1f} us  x{gain:4.2f}", flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
