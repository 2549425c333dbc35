"""A one-row decode step's FP8 matmuls with a scale per row (FP8 W8A8 from `--quantization fp8`), on the
GPU: Qwen3-8B's 36 layers, each with its own weights, the four matmuls of every layer with the decode
step's fusions, captured in one CUDA graph under dependent launch (as the engine captures small
decode batches) and replayed. Paths: bf16 weights (reference), ops/gemv.py's element-wise kernel,
and ops/gemv_fp8.py's word kernel over a sweep of its tiles. Each FP8 path is first checked against
the element-wise kernel's output.

  python benchmarks/experiments/time_fp8_words.py [--out result.json]
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
from sageinfer.ops.gemv_fp8 import FP8_GEMV_CONFIG  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
LAYERS = 36


def make_layer(fp8: bool, dev: str):
    out = {}
    for name, (n, k) in SHAPES.items():
        if fp8:
            w = (torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[name] = (w, torch.rand(n, device=dev) * 1e-4 + 1e-5)
        else:
            out[name] = (torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, None)
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiles", default="2x512,2x1024,4x256,4x512,4x1024,8x256,8x512",
                        help="rows x words of the swept tiles (each at --warps)")
    parser.add_argument("--warps", default="4,8")
    args = parser.parse_args()
    args.tiles = list(itertools.product([tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")],
                                        [int(w) for w in args.warps.split(",")]))
    dev = "cuda"
    weight_bytes = sum(n * k for n, k in SHAPES.values()) * LAYERS
    result = {}
    print("| weights | path | step's matmuls (ms) | GB/s of weights read |")
    print("| --- | --- | --- | --- |")
    for fp8 in (False, True):
        layers = [make_layer(fp8, dev) for _ in range(LAYERS)]
        paths = {"bf16": None} if not fp8 else {"elements": {"words": False}, "words (default)": None}
        if fp8:
            for (bn, words), warps in args.tiles:
                paths[f"words bn{bn} w{words} x{warps} s2"] = {"block_n": bn, "words": words, "num_warps": warps,
                                                               "num_stages": 2}
            # Output check: the first layer's qkv through each path against the element-wise kernel.
            x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
            w, scale = layers[0]["qkv"]
            ref = gemv(x, w, weight_scale=scale, config={"words": False}).float()
        for path, config in paths.items():
            if fp8 and path != "elements":
                out = gemv(x, w, weight_scale=scale, config=config).float()
                err = ((out - ref).norm() / ref.norm()).item()
                if err > 5e-3:
                    print(f"| fp8 | {path} | WRONG: relative error {err:.2e} | |", flush=True)
                    continue
            for activate in (False, True) if path in ("bf16", "elements", "words (default)") else (False,):
                calls = [c for layer in layers for c in layer_calls(layer, dev, config, activate)]
                with launch.dependent_launch(True):
                    t = graph_time(lambda: [fn() for fn in calls], reps=50)
                name = f"{path}{' +activate' if activate else ''}"
                result[name] = t * 1e3
                gb = weight_bytes * (1 if fp8 else 2) / t / 1e9
                print(f"| {'fp8' if fp8 else 'bf16'} | {name} | {t * 1e3:.3f} | {gb:.0f} |", flush=True)
        if fp8:  # the fastest three tiles again at 1 and 3 stages
            best = sorted((p for p in result if p.startswith("words ") and "activate" not in p), key=result.get)[:3]
            for path in best:
                for stages in (1, 3):
                    config = dict(paths[path], num_stages=stages)
                    calls = [c for layer in layers for c in layer_calls(layer, dev, config, False)]
                    with launch.dependent_launch(True):
                        t = graph_time(lambda: [fn() for fn in calls], reps=50)
                    name = path[:-2] + f"s{stages}"
                    result[name] = t * 1e3
                    print(f"| fp8 | {name} | {t * 1e3:.3f} | {weight_bytes / t / 1e9:.0f} |", flush=True)
        del layers
        torch.cuda.empty_cache()
    best = sorted((p for p in result if p.startswith("words")), key=result.get)[:5]
    print("fastest word paths:", [(p, round(result[p], 3)) for p in best], "default:", FP8_GEMV_CONFIG)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
