"""A one-row decode step's 8-bit matmuls with a scale per row and group of input features (block FP8
and W8A16: 128; NVFP4 held as INT8: 16; MXFP4: 32), as the engine runs them, on the GPU: Qwen3-8B's 36 layers, each with its own weights, the
four matmuls of every layer captured in one CUDA graph and replayed (what TPOT sees).

  python benchmarks/experiments/time_8bit_step.py [--formats fp8,int8] [--group 128] [--out result.json]

Paths: "bf16" (16-bit weights through ops/gemv.py), "channel" (a scale per row: the per-channel FP8
floor of the same bytes), "grouped" (ops/gemv_grouped.py as configured), "grouped bnN cC wW" (N rows
a program, C input columns a trip, W warps), "matmul"
(ops/weight_only.py's tensor-core kernel, K split to twice the processors' programs, without the
fusions: the norm and activation would run as kernels of their own). The grouped sweep runs on the
first format; its best three run on the others.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.gemv import gemv  # noqa: E402
from sageinfer.ops.weight_only import w8a16_block_matmul  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS = 36


def make_layer(fmt: str, dev: str, group: int):
    """8-bit weights (or bf16 ones) and their scales per row and group, per matmul."""
    out = {}
    for name, (n, k) in SHAPES.items():
        if fmt == "bf16":
            out[name] = (torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, None)
            continue
        q = torch.randint(-100, 100, (n, k), device=dev, dtype=torch.int8)
        w = q if fmt == "int8" else (q.float() * 0.04).to(torch.float8_e4m3fn)
        out[name] = (w, torch.rand(n, k // group, device=dev) * 0.002 + 0.0005)
    return out


def layer_calls(path: str, layer: dict, dev: str, num_sms: int, group: int):
    """The four matmuls of one layer for this path at one row, as closures over their inputs."""
    dt = torch.bfloat16
    calls = []
    for name, (n, k) in SHAPES.items():
        w, scales = layer[name]
        width = 2 * k if name == "down" else k
        x = torch.randn(1, width, device=dev, dtype=dt) * 0.1
        if name in ("qkv", "gate_up"):  # the decode step's fusions at one row
            fused = {"norm_weight": torch.ones(k, device=dev, dtype=dt), "eps": 1e-6}
        else:
            fused = {"gated": name == "down", "residual": torch.zeros(1, n, device=dev, dtype=dt)}
        if path == "matmul":
            xs = x[:, :k].contiguous()
            calls.append(lambda x=xs, w=w, s=scales: w8a16_block_matmul(x, w, s, group, min_programs=2 * num_sms))
            continue
        kwargs = dict(fused)
        if path == "channel":
            kwargs["weight_scale"] = scales[:, 0].contiguous()
        elif path != "bf16":
            kwargs["weight_scale"] = scales
        if path.startswith("grouped "):
            bn, columns, warps = (int(p[1:]) if p[0] in "cw" else int(p[2:]) for p in path.split()[1:])
            kwargs["config"] = {"block_n": bn, "columns": columns, "num_warps": warps, "num_stages": 2}
        calls.append(lambda x=x, w=w, a=kwargs: gemv(x, w, **a))
    return calls


def time_path(path: str, layers: list, dev: str, num_sms: int, group: int):
    calls = [c for layer in layers for c in layer_calls(path, layer, dev, num_sms, group)]
    try:
        return graph_time(lambda: [fn() for fn in calls], reps=50)
    except Exception as exc:  # noqa: BLE001 (a tile past the device's resources)
        print(f"| {path} | failed: {type(exc).__name__}: {str(exc)[:80]} | |", flush=True)
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="fp8,int8")
    parser.add_argument("--group", type=int, default=128, help="input features a scale covers")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = "cuda"
    num_sms = get_platform().num_compute_units()
    sweep = [f"grouped bn{bn} c{c} w{w}" for bn, c, w in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8))
             if c >= args.group]
    result, best = {}, []
    print("| format | path | step's matmuls (ms) | GB/s of weights read |")
    print("| --- | --- | --- | --- |")
    bf16 = [make_layer("bf16", dev, args.group) for _ in range(LAYERS)]
    t = time_path("bf16", bf16, dev, num_sms, args.group)
    byte_count = sum(n * k for n, k in SHAPES.values()) * LAYERS
    print(f"| bf16 | bf16 | {t * 1e3:.3f} | {2 * byte_count / t / 1e9:.0f} |", flush=True)
    result["bf16"] = t * 1e3
    del bf16
    for i, fmt in enumerate(args.formats.split(",")):
        layers = [make_layer(fmt, dev, args.group) for _ in range(LAYERS)]
        paths = ["channel", "grouped", "matmul"] + (sweep if i == 0 else best[:3])
        times = {}
        for path in paths:
            t = time_path(path, layers, dev, num_sms, args.group)
            if t is None:
                continue
            times[path] = t * 1e3
            print(f"| {fmt} | {path} | {t * 1e3:.3f} | {byte_count / t / 1e9:.0f} |", flush=True)
        if i == 0:
            best = sorted((p for p in times if p.startswith("grouped")), key=times.get)
            print("best grouped:", best[:3], flush=True)
        result[fmt] = times
        del layers
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
