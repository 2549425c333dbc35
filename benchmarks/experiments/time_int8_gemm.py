"""A layer's four INT8 W8A8 matmuls (Qwen3-8B shapes) at several row counts on the GPU: the library path
(torch._int_mm through the platform, then the scales in torch, as W8A8 layers ran it on NVIDIA) against
the Triton kernel of ops/int8_matmul.py in several tiles, each captured in a CUDA graph over distinct
layers' weights and replayed (candidates marked tma: the descriptor kernel in one persistent program an
SM). Prints ms per layer and INT8 TOP/s, and checks every path against the library's result.

  python benchmarks/experiments/time_int8_gemm.py [--rows 32,256,2048,16000] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.int8_matmul import FAST_CONFIGS, int8_matmul  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
# (block_m, block_n, block_k, warps, stages[, the descriptor kernel: "tma" one persistent program an SM,
# "tma-tiles" a program a tile])
CANDIDATES = [(64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
              (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (128, 256, 64, 8, 4),
              (64, 64, 128, 4, 4, "tma-tiles"), (64, 128, 128, 4, 4, "tma-tiles"), (64, 128, 128, 4, 4, "tma"),
              (128, 128, 128, 8, 3, "tma"), (128, 128, 128, 8, 4, "tma"), (128, 256, 128, 8, 3, "tma"),
              (128, 256, 64, 8, 4, "tma")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="32,256,2048,16000")
    parser.add_argument("--out")
    args = parser.parse_args()
    dev, platform = "cuda", get_platform()
    result = {"device": torch.cuda.get_device_name(), "rows": {}}
    fast = {tuple(cfg[key] for key in ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
            for _, cfg in FAST_CONFIGS}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (int(r) for r in args.rows.split(",")):
        layers = 36 if m <= 512 else 2  # small row counts read the weights: not from L2
        weights = [{name: (torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8),
                           torch.rand(n, device=dev) * 0.01 + 1e-3) for name, (n, k) in SHAPES.items()}
                   for _ in range(layers)]
        inputs = {name: (torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8),
                         torch.rand(m, 1, device=dev) * 0.01) for name, (n, k) in SHAPES.items()}

        def run(path, keep=None):
            for layer in weights:
                for name, (wq, w_scale) in layer.items():
                    xq, x_scale = inputs[name]
                    if path == "library":
                        acc = platform.int8_matmul(xq, wq)
                        y = (acc.float() * x_scale * w_scale.view(1, -1)).to(torch.bfloat16)
                    else:
                        bm, bn, bk, w, s, *tma = path
                        y = int8_matmul(xq, x_scale, wq, w_scale, torch.bfloat16,
                                        {"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": w, "num_stages": s,
                                         **({"programs": sms if tma == ["tma"] else 2 ** 31} if tma else {})})
                    if keep is not None:
                        keep[name] = y
        reference = {}
        run("library", reference)
        ops = 2 * m * sum(n * k for n, k in SHAPES.values())
        rows = {}
        for path in ["library", *CANDIDATES]:
            got = {}
            try:
                run(path, got)
                err = max(float(((got[n].float() - reference[n].float()).norm() / reference[n].float().norm()))
                          for n in SHAPES)
                seconds = graph_time(lambda p=path: run(p), reps=5 if m > 512 else 20) / layers
            except Exception as exc:  # a tile that does not fit the shared memory
                print(f"rows {m} {path}: {type(exc).__name__} {str(exc)[:120]}")
                continue
            label = "library" if path == "library" else "x".join(map(str, path)) + (" *" if path in fast else "")
            rows[label] = {"ms_per_layer": seconds * 1e3, "tops": ops / seconds / 1e12, "rel_err": err}
            print(f"rows {m:>6} {label:<22} {seconds * 1e3:8.3f} ms/layer {ops / seconds / 1e12:7.0f} TOP/s "
                  f"err {err:.1e}", flush=True)
        result["rows"][m] = rows
        del weights, inputs
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
