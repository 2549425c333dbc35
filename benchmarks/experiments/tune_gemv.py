"""Skinny decode matmul (ops/gemv.py) vs torch/cuBLAS on Qwen3-8B's layer shapes, on the GPU.

  python benchmarks/experiments/tune_gemv.py [--out result.json]

Sweeps tile shapes at M = 1, then times the best at M = 1, 2, 4, 8 and sums one decode step's
linear layers (36 x qkv, o, gate_up, down + lm_head).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.gemv import gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288),
          "lm_head": (151936, 4096)}
PER_STEP = {"qkv": 36, "o": 36, "gate_up": 36, "down": 36, "lm_head": 1}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e-3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    weights = {name: torch.randn(n, k, device=dev, dtype=dt) * 0.02 for name, (n, k) in SHAPES.items()}
    configs = [{"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st}
               for bn, bk, w, st in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (2, 3, 4))
               if bn * bk <= 16384]
    sweep = []
    for cfg in configs:
        total = 0.0
        try:
            for name, w in weights.items():
                x = torch.randn(1, w.shape[1], device=dev, dtype=dt)
                total += bench(lambda: gemv(x, w, config=cfg)) * PER_STEP[name]  # noqa: B023
        except Exception as exc:  # noqa: BLE001  (resources exceeded for this tile)
            print(cfg, "failed", type(exc).__name__)
            continue
        sweep.append((total, cfg))
        print(f"{cfg}: step linear time {total * 1e3:.3f} ms", flush=True)
    sweep.sort(key=lambda r: r[0])
    best = sweep[0][1]
    rows = {"best_config": best, "sweep_top5": [(t * 1e3, c) for t, c in sweep[:5]], "shapes": {}}
    for m in (1, 2, 4, 8):
        step_ours = step_torch = 0.0
        for name, w in weights.items():
            x = torch.randn(m, w.shape[1], device=dev, dtype=dt)
            ref = torch.nn.functional.linear(x, w)
            out = gemv(x, w, config=best)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t_ours = bench(lambda: gemv(x, w, config=best))  # noqa: B023
            t_torch = bench(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
            nbytes = w.numel() * 2
            step_ours += t_ours * PER_STEP[name]
            step_torch += t_torch * PER_STEP[name]
            rows["shapes"][f"M{m} {name}"] = {"gemv_us": t_ours * 1e6, "torch_us": t_torch * 1e6,
                                              "gemv_gbs": nbytes / t_ours / 1e9, "torch_gbs": nbytes / t_torch / 1e9,
                                              "rel_err": err}
            print(f"M={m} {name:8s} gemv {t_ours * 1e6:7.1f} us ({nbytes / t_ours / 1e9:5.0f} GB/s)  torch "
                  f"{t_torch * 1e6:7.1f} us ({nbytes / t_torch / 1e9:5.0f} GB/s)  err {err:.1e}", flush=True)
        rows[f"M{m} step_linear_ms"] = {"gemv": step_ours * 1e3, "torch": step_torch * 1e3}
        print(f"M={m}: one decode step's linears: gemv {step_ours * 1e3:.3f} ms, torch {step_torch * 1e3:.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
