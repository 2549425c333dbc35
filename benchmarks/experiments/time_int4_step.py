"""A decode step's 4-bit matmuls as the engine runs them, on the GPU: Qwen3-8B's 36 layers, each with
its own weights (so nothing stays in L2 between layers), the four matmuls of every layer captured in
one CUDA graph and replayed. Single-layer timings of these kernels vary up to 2x run to run; a whole
step replayed is what TPOT sees.

  python benchmarks/experiments/time_int4_step.py [--rows 1,2,8,16,32] [--out result.json]

Paths, per row count: "gemv" (ops/gemv_int4.py's CUDA-core kernel; at one row with the decode step's
fusions: RMSNorm into qkv and gate_up, the residual into o, SiLU-and-mul and the residual into down;
"gemv split" over parts of K too, for twice the processors' programs),
"mma bnN" (the tensor-core matmul with N features a program; "mma" the engine's choice; "mma split"
with programs over parts of K too, as many as fill twice the processors), "expand"
(one-pass expansion + library GEMM), and bf16 weights through the engine's path for them (gemv at one
row, the library GEMM above).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.gemv import gemv  # noqa: E402
from sageinfer.ops.gemv_int4 import INT4_GEMV_CONFIG, w4a16_mma_matmul  # noqa: E402
from sageinfer.ops.weight_only import dequantize_kernel, pack  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS, GROUP, SLICE = 36, 128, 128


def make_layer(dev: str):
    """Packed words, scales, zero points and the bf16 weights they encode, per matmul."""
    out = {}
    for name, (n, k) in SHAPES.items():
        q = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        scales = (torch.rand(n, k // GROUP, device=dev) * 0.002 + 0.0005).to(torch.bfloat16)
        dense = ((q.float() - 8) * scales.float().repeat_interleave(GROUP, 1)).to(torch.bfloat16)
        out[name] = (pack(q, SLICE), scales, torch.zeros_like(scales, dtype=torch.int32), dense)
        del q
    return out


def layer_calls(path: str, rows: int, layer: dict, dev: str, num_sms: int | None = None):
    """The four matmuls of one layer for this path, as closures over their inputs."""
    dt = torch.bfloat16
    calls = []
    for name, (n, k) in SHAPES.items():
        packed, scales, zeros, dense = layer[name]
        width = 2 * k if name == "down" else k
        x = torch.randn(rows, width, device=dev, dtype=dt) * 0.1
        fused = {}
        if rows == 1 and path in ("gemv", "gemv split", "bf16"):  # the decode step's fusions at one row
            if name in ("qkv", "gate_up"):
                fused = {"norm_weight": torch.ones(k, device=dev, dtype=dt), "eps": 1e-6}
            else:
                fused = {"gated": name == "down", "residual": torch.zeros(rows, n, device=dev, dtype=dt)}
        elif name == "down":
            x = x[:, :k].contiguous()  # above one row the activation runs on its own: the input is k wide
        if path.startswith("gemv"):  # "gemv split": over parts of K too, to twice the processors' programs
            cfg = dict(INT4_GEMV_CONFIG, block_n=max(4, INT4_GEMV_CONFIG["block_n"] // rows),
                       min_programs=2 * num_sms if path == "gemv split" else 0)
            calls.append(lambda x=x, p=packed, s=scales, f=fused, c=cfg: gemv(x, p, weight_scale=s, int4=True,
                                                                              slice_width=SLICE, config=c, **f))
        elif path.startswith("mma"):
            cfg = {"block_n": int(path[6:]), "num_warps": 4, "num_stages": 2} if path.startswith("mma bn") else None
            split = 0 if path == "mma split" else 1
            calls.append(lambda x=x, p=packed, s=scales, c=cfg, sk=split: w4a16_mma_matmul(
                x, p, s, None, GROUP, SLICE, c, num_sms, split_k=sk))
        elif path == "expand":
            calls.append(lambda x=x, p=packed, s=scales, z=zeros: torch.nn.functional.linear(
                x, dequantize_kernel(p, s, z, GROUP, dt, SLICE)))
        elif rows == 1:  # bf16 weights, one row: the engine's skinny kernel
            calls.append(lambda x=x, w=dense, f=fused: gemv(x, w, **f))
        else:
            calls.append(lambda x=x, w=dense: torch.nn.functional.linear(x, w))
    return calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,8,16,32")
    parser.add_argument("--paths", default="gemv,gemv split,mma,mma split,mma bn32,mma bn64,expand,bf16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = "cuda"
    num_sms = get_platform().num_compute_units()  # as the engine's W4A16 layers pass it
    layers = [make_layer(dev) for _ in range(LAYERS)]
    words = sum(p.numel() * 4 for p, *_ in layers[0].values()) * LAYERS
    print(f"{LAYERS} layers, {words / 1e9:.2f} GB of 4-bit words a step", flush=True)
    result = {"rows": {}}
    print("| rows | path | step's matmuls (ms) | GB/s of weights read |")
    print("| --- | --- | --- | --- |")
    for rows in (int(r) for r in args.rows.split(",")):
        for path in args.paths.split(","):
            if path.startswith("gemv") and rows > 8:
                continue
            calls = [c for layer in layers for c in layer_calls(path, rows, layer, dev, num_sms)]
            try:
                t = graph_time(lambda: [fn() for fn in calls], reps=50)  # noqa: B023
            except Exception as exc:  # noqa: BLE001 (a tile past the device's resources)
                print(f"| {rows} | {path} | failed: {type(exc).__name__} | |", flush=True)
                continue
            read = words * (4 if path == "bf16" else 1)  # bf16 weights: 4x the 4-bit words' bytes
            result["rows"][f"{rows} {path}"] = {"ms": t * 1e3, "gbs": read / t / 1e9}
            print(f"| {rows} | {path} | {t * 1e3:.3f} | {read / t / 1e9:.0f} |", flush=True)
            del calls
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
