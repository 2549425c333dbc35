"""The one-row 4-bit matmul in fp16 pairs (ops/gemv_int4_halves.py) against the fp32 kernel
(ops/gemv_int4.py) at Qwen3-8B's layer shapes, each called as a decode step calls it (norm folded into
qkv and gate_up, residual into o, SiLU-and-mul and residual into down), on the GPU:

  python benchmarks/experiments/tune_int4_halves.py [--out result.json]

Sweeps the pair kernel's rows per program, warps and split-K target; prints microseconds per layer,
the step's sum over 36 layers and the error against the dequantized weights' product.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tune_int4_gemv import GROUP, LAYERS, SHAPES, bench, make, rel_err, step_call  # noqa: E402

from sageinfer.ops.gemv import gemv  # noqa: E402
from sageinfer.ops.gemv_int4_halves import int4_gemv_halves  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    layers = {name: make(n, k, 128, dev) for name, (n, k) in SHAPES.items()}
    calls = {name: step_call(name, 1, k, dev, dt) for name, (n, k) in SHAPES.items()}

    def fp32_kernel(name):
        packed, scales, _, _ = layers[name]
        x, kw = calls[name]
        return lambda: gemv(x, packed, weight_scale=scales, int4=True, slice_width=128, **kw)

    def pairs(name, cfg):
        packed, scales, _, _ = layers[name]
        x, kw = calls[name]
        n = SHAPES[name][0]
        y = kw["residual"] if "residual" in kw else torch.empty(1, n, device=dev, dtype=dt)
        return lambda: int4_gemv_halves(x, packed, scales, None, GROUP, 128, y, None, kw.get("gated", False),
                                        kw.get("norm_weight"), kw.get("eps", 0.0), "residual" in kw, True, cfg)

    def reference(name):
        x, kw = calls[name]
        dense = layers[name][3]
        return gemv(x, dense, **{k: (v.clone() if k == "residual" else v) for k, v in kw.items()})

    result = {"fp32_kernel_us": {}, "sweep": []}
    for name in SHAPES:
        result["fp32_kernel_us"][name] = bench(fp32_kernel(name)) * 1e6
    step = sum(result["fp32_kernel_us"].values()) * LAYERS / 1e3
    print("fp32 kernel (us):", {k: round(v, 1) for k, v in result["fp32_kernel_us"].items()}, f"step {step:.3f} ms")
    for bn, warps, programs in itertools.product((16, 32, 64), (2, 4, 8), (0, 264)):
        cfg = {"block_n": bn, "num_warps": warps, "num_stages": 1, "min_programs": programs}
        times, errs = {}, {}
        try:
            for name in SHAPES:
                fn = pairs(name, cfg)
                if "residual" in calls[name][1]:
                    calls[name][1]["residual"].zero_()
                ref = reference(name)
                errs[name] = rel_err(fn(), ref)
                times[name] = bench(fn) * 1e6
        except Exception as exc:  # noqa: BLE001  (resources exceeded for this tile)
            print(cfg, "failed", type(exc).__name__, str(exc)[:200], flush=True)
            continue
        total = sum(times.values()) * LAYERS / 1e3
        result["sweep"].append({**cfg, "us": times, "err": errs, "ms": total})
        print(f"{cfg}: " + " ".join(f"{k} {v:6.1f}" for k, v in times.items())
              + f"  step {total:.3f} ms  err {max(errs.values()):.1e}", flush=True)
    best = min(result["sweep"], key=lambda r: r["ms"])
    result["best"] = best
    print("best", best)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
