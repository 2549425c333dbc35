"""4-bit weight matmuls (W4A16, group 128) at Qwen3-8B's layer shapes, on the GPU: the one-row kernel's
tiles, then the 4-bit paths by rows against bf16 weights through the same paths.

  python benchmarks/experiments/tune_int4_gemv.py [--out result.json] [--rows 1,2,4,8,16,64,4096]

Each layer is timed as a decode step calls it at one row: qkv and gate_up with the RMSNorm folded in,
o with the residual add, down with SiLU-and-mul and the residual add. Sweeps ops/gemv_int4.py's
configuration (rows per program, warps, stages; the CUDA-core and the tensor-core kernel) at one
row, summing the four matmuls x 36 layers; then times, by rows, the skinny kernel (up to 8 rows, the
best tile divided by rows as the engine does; with --no-sweep the engine's configuration), the
tensor-core matmul (ops/gemv_int4.w4a16_mma_matmul, up to 256 rows; the engine's block_n, then 32
and 64) and the one-pass expansion + library GEMM, each checked against the dequantized weights.
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

from sageinfer.ops.gemv import gemv  # noqa: E402
from sageinfer.ops.gemv_int4 import INT4_GEMV_CONFIG, w4a16_mma_matmul  # noqa: E402
from sageinfer.ops.weight_only import dequantize_kernel, pack  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS, GROUP = 36, 128


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e-3


def make(n: int, k: int, slice_width: int, dev: str):
    q = torch.randint(0, 16, (n, k), device=dev)
    scales = (torch.rand(n, k // GROUP, device=dev) * 0.002 + 0.0005).to(torch.bfloat16)
    zeros = torch.zeros(n, k // GROUP, dtype=torch.int32, device=dev)
    dense = ((q.float() - 8) * scales.float().repeat_interleave(GROUP, 1)).to(torch.bfloat16)
    return pack(q, slice_width), scales, zeros, dense


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step_call(name: str, rows: int, k: int, dev: str, dt):
    """The input and the fusion arguments a decode step gives this layer."""
    x = torch.randn(rows, 2 * k if name == "down" else k, device=dev, dtype=dt)
    n = SHAPES[name][0]
    if name in ("qkv", "gate_up"):
        return x, {"norm_weight": torch.ones(k, device=dev, dtype=dt), "eps": 1e-6}
    return x, {"gated": name == "down", "residual": torch.zeros(rows, n, device=dev, dtype=dt)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rows", default="1,2,4,8,16,64,4096")
    parser.add_argument("--no-sweep", action="store_true", help="time ops/gemv_int4.py's configuration only")
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    num_sms = get_platform().num_compute_units()  # as the engine's W4A16 layers pass it
    result = {"sweep": [], "by_rows": {}}
    layers = {128: {name: make(n, k, 128, dev) for name, (n, k) in SHAPES.items()}}
    calls = {name: step_call(name, 1, k, dev, dt) for name, (n, k) in SHAPES.items()}
    bf16 = {nm: bench(lambda: gemv(calls[nm][0], layers[128][nm][3], **calls[nm][1])) for nm in SHAPES}  # noqa: B023
    print("bf16 weights through gemv, one row (us):", {k: round(v * 1e6, 1) for k, v in bf16.items()},
          f"step {sum(bf16.values()) * LAYERS * 1e3:.3f} ms", flush=True)
    result["bf16_one_row_us"] = {k: v * 1e6 for k, v in bf16.items()}
    configs = [(128, bn, w, st, False) for bn, w, st in itertools.product((8, 16, 32), (4, 8), (1, 2))]
    configs += [(128, bn, w, st, True) for bn, w, st in itertools.product((64, 128), (4, 8), (2, 3))]
    if args.no_sweep:
        configs = [(128, INT4_GEMV_CONFIG["block_n"], INT4_GEMV_CONFIG["num_warps"], INT4_GEMV_CONFIG["num_stages"],
                    bool(INT4_GEMV_CONFIG.get("mma")))]
    for s, bn, warps, stages, mma in configs:
        cfg = {"block_n": bn, "num_warps": warps, "num_stages": stages, "mma": mma}
        times = {}
        try:
            for name in SHAPES:
                packed, scales, _, _ = layers[s][name]
                x, kw = calls[name]
                times[name] = bench(lambda: gemv(x, packed, config=cfg, weight_scale=scales,  # noqa: B023
                                                 int4=True, slice_width=s, **kw))  # noqa: B023
        except Exception as exc:  # noqa: BLE001  (resources exceeded for this tile)
            print(s, cfg, "failed", type(exc).__name__, flush=True)
            continue
        total = sum(times.values()) * LAYERS
        result["sweep"].append({"slice": s, **cfg, "us": {k: v * 1e6 for k, v in times.items()}, "ms": total * 1e3})
        print(f"{cfg}: " + " ".join(f"{k} {v * 1e6:6.1f}" for k, v in times.items())
              + f"  step {total * 1e3:.3f} ms", flush=True)
    best = min(result["sweep"], key=lambda r: r["ms"])
    result["best"] = best
    cfg = None if args.no_sweep else {k: best[k] for k in ("block_n", "num_warps", "num_stages", "mma")}
    s = best["slice"]
    print("best", best, flush=True)
    print("| rows | path | qkv | o | gate_up | down | GB/s of 4-bit words (gate_up) | bf16 (same rows) | err |")
    for rows in (int(r) for r in args.rows.split(",")):
        for path in ("gemv", "mma", "mma bn32", "mma bn64", "expand"):
            if (path == "gemv" and rows > 8) or (path.startswith("mma") and rows > 256):
                continue
            # The engine's division of block_n by rows (ops/gemv_int4.int4_gemv).
            row_cfg = cfg and dict(cfg, block_n=max(4, cfg["block_n"] // triton.next_power_of_2(rows)))
            mma_cfg = {"block_n": int(path[-2:]), "num_warps": 4, "num_stages": 2} if path[-2:].isdigit() else None
            line = {}
            for name, (n, k) in SHAPES.items():
                packed, scales, zeros, dense = layers[s][name]
                x = torch.randn(rows, k, device=dev, dtype=dt)
                if path == "gemv":
                    fn = lambda: gemv(x, packed, config=row_cfg, weight_scale=scales, int4=True, slice_width=s)  # noqa: E731,B023
                    ref_fn = lambda: gemv(x, dense)  # noqa: E731,B023
                elif path.startswith("mma"):  # the engine's block_n, or the one named
                    fn = lambda: w4a16_mma_matmul(x, packed, scales, None, GROUP, s, mma_cfg, num_sms)  # noqa: E731,B023
                    ref_fn = lambda: torch.nn.functional.linear(x, dense)  # noqa: E731,B023
                else:
                    fn = lambda: torch.nn.functional.linear(  # noqa: E731
                        x, dequantize_kernel(packed, scales, zeros, GROUP, dt, s))  # noqa: B023
                    ref_fn = lambda: torch.nn.functional.linear(x, dense)  # noqa: E731,B023
                err = rel_err(fn(), torch.nn.functional.linear(x.float(), dense.float()))
                line[name] = {"us": bench(fn) * 1e6, "bf16_us": bench(ref_fn) * 1e6, "err": err}
            gbs = SHAPES["gate_up"][0] * SHAPES["gate_up"][1] / 2 / (line["gate_up"]["us"] * 1e-6) / 1e9
            result["by_rows"][f"{rows} {path}"] = line
            print(f"| {rows} | {path} | " + " | ".join(f"{v['us']:.1f}" for v in line.values())
                  + f" | {gbs:.0f} | " + " / ".join(f"{v['bf16_us']:.1f}" for v in line.values())
                  + f" | {max(v['err'] for v in line.values()):.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
