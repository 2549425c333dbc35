"""A one-row decode step's matmuls on the GPU, ops/gemv.py's element-wise kernel against ops/gemv_words.py's
word kernel: Qwen3-8B's 36 layers, each with its own weights, the four matmuls of every layer with the
decode step's fusions, captured in one CUDA graph under dependent launch (as the engine captures small
decode batches) and replayed. Weight kinds: bf16, FP8 e4m3 and INT8 with a scale per row (`--quantization
fp8`, INT8 W8A8). Each word tile is first checked against the element-wise kernel's output, then swept.

  python benchmarks/experiments/time_gemv_words.py [--kinds bf16,fp8,int8] [--tiles 8x256,16x256] [--out result.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops import launch  # noqa: E402
from sageinfer.ops.gemv import gemv  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS = 36
BYTES = {"bf16": 2, "fp8": 1, "int8": 1}


def make_layer(kind: str, dev: str):
    out = {}
    for name, (n, k) in SHAPES.items():
        if kind == "fp8":
            w = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        elif kind == "int8":
            w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        else:
            out[name] = (torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, None)
            continue
        out[name] = (w, torch.rand(n, device=dev) * 1e-4 + 1e-5)
    return out


def layer_calls(layer: dict, dev: str, config: dict | None, activate: bool):
    """The four matmuls of one layer at one row with the step's fusions (norm into qkv and gate_up, the
    residual into o and down; the down projection's input gated, or formed by gate_up with activate)."""
    dt = torch.bfloat16
    calls = []
    for name, (n, k) in SHAPES.items():
        w, scale = layer[name]
        gated = name == "down" and not activate
        x = torch.randn(1, 2 * k if gated else k, device=dev, dtype=dt) * 0.5
        kwargs = {"config": config} if config else {}
        if scale is not None:
            kwargs["weight_scale"] = scale
        if name in ("qkv", "gate_up"):
            kwargs.update(norm_weight=torch.ones(k, device=dev, dtype=dt), eps=1e-6,
                          activate=activate and name == "gate_up")
        else:
            kwargs.update(gated=gated, residual=torch.zeros(1, n, device=dev, dtype=dt))
        calls.append(lambda x=x, w=w, a=kwargs: gemv(x, w, **a))
    return calls


def timed(layers, dev, config, activate=False) -> float:
    calls = [c for layer in layers for c in layer_calls(layer, dev, config, activate)]
    with launch.dependent_launch(True):
        return graph_time(lambda: [fn() for fn in calls], reps=50)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--kinds", default="bf16,fp8,int8")
    parser.add_argument("--tiles", default="4x256,8x128,8x256,16x256", help="rows x words of the swept tiles")
    parser.add_argument("--warps", default="4")
    args = parser.parse_args()
    tiles = list(itertools.product([tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")],
                                   [int(w) for w in args.warps.split(",")]))
    dev = "cuda"
    weights = sum(n * k for n, k in SHAPES.values()) * LAYERS
    result = {}
    print("| weights | path | step's matmuls (ms) | GB/s of weights read |")
    print("| --- | --- | --- | --- |")
    for kind in args.kinds.split(","):
        layers = [make_layer(kind, dev) for _ in range(LAYERS)]
        paths = {"elements": {"elements": True}, "words (default)": None}
        for (bn, words), warps in tiles:
            paths[f"words bn{bn} w{words} x{warps}"] = {"block_n": bn, "words": words, "num_warps": warps,
                                                        "num_stages": 2}
        x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
        w, scale = layers[0]["qkv"]
        ref = gemv(x, w, weight_scale=scale, config={"elements": True}).float()
        for path, config in paths.items():
            out = gemv(x, w, weight_scale=scale, config=config).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if err > 5e-3:
                print(f"| {kind} | {path} | WRONG: relative error {err:.2e} | |", flush=True)
                continue
            for activate in (False, True) if path in ("elements", "words (default)") else (False,):
                t = timed(layers, dev, config, activate)
                name = f"{kind} {path}{' +activate' if activate else ''}"
                result[name] = t * 1e3
                print(f"| {kind} | {name} | {t * 1e3:.3f} | {weights * BYTES[kind] / t / 1e9:.0f} |", flush=True)
        del layers
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
