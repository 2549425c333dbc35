"""Single-stream decode pieces timed the way a decode step runs them: 36 launches on distinct
weights / layers captured in one CUDA graph, so launch latency is gone and L2 holds nothing.

  python benchmarks/experiments/tune_decode_step.py --out result.json

1. Skinny matmul (ops/gemv.py) tile configurations per Qwen3-8B shape at M = 1, vs torch.
2. Decode attention at batch 1 by split count, for a short (640) and a long (32,000) context.
3. The chain of a step's skinny matmuls (qkv -> o -> gate_up -> gated down, 36 times), each reading
   the one before, with and without programmatic dependent launch, with and without the norms.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops import launch
from sageinfer.ops.gemv import gemv
from sageinfer.ops.paged_attention import paged_attention

SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (24576, 4096, False),
          "down (gated)": (4096, 12288, True), "lm_head": (151936, 4096, False)}
LAYERS = 36


def graph_time(fn, reps=20) -> float:
    """Seconds per replay of a graph that runs fn once (fn itself loops over layers)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e-3


def tune_gemv(result: dict) -> None:
    dev, dt = "cuda", torch.bfloat16
    configs = [{"block_n": bn, "block_k": bk, "num_warps": w, "num_stages": st}
               for bn, bk, w, st in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (3, 4))
               if bn * bk <= 16384]
    for name, (n, k, gated) in SHAPES.items():
        count = 1 if name == "lm_head" else LAYERS
        weights = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(count)]
        x = torch.randn(1, 2 * k if gated else k, device=dev, dtype=dt)
        nbytes = count * n * k * 2
        rows = []
        for cfg in configs:
            try:
                t = graph_time(lambda: [gemv(x, w, config=cfg, gated=gated) for w in weights])  # noqa: B023
            except Exception as exc:  # noqa: BLE001  (tile over the device's resources)
                print(name, cfg, "failed", type(exc).__name__, flush=True)
                continue
            rows.append((t, cfg))
        rows.sort(key=lambda r: r[0])
        if gated:
            from sageinfer.ops.activation import silu_and_mul
            t_torch = graph_time(lambda: [torch.nn.functional.linear(silu_and_mul(x), w) for w in weights])  # noqa: B023
        else:
            t_torch = graph_time(lambda: [torch.nn.functional.linear(x, w) for w in weights])  # noqa: B023
        best_t, best_cfg = rows[0]
        result[name] = {"best": best_cfg, "best_us_per_launch": best_t / count * 1e6,
                        "best_tbs": nbytes / best_t / 1e12, "torch_us_per_launch": t_torch / count * 1e6,
                        "torch_tbs": nbytes / t_torch / 1e12,
                        "top5": [(t / count * 1e6, c) for t, c in rows[:5]]}
        print(f"{name:13s} best {best_cfg} {best_t / count * 1e6:7.1f} us ({nbytes / best_t / 1e12:.2f} TB/s); "
              f"torch {t_torch / count * 1e6:7.1f} us ({nbytes / t_torch / 1e12:.2f} TB/s)", flush=True)
        del weights
        torch.cuda.empty_cache()


def tune_decode_attention(result: dict) -> None:
    dev, dt = "cuda", torch.bfloat16
    hq, hkv, d, page = 32, 8, 128, 16
    for ctx in (640, 32000):
        blocks = -(-ctx // page)
        caches = [(torch.randn(blocks + 1, page, hkv, d, device=dev, dtype=dt),
                   torch.randn(blocks + 1, page, hkv, d, device=dev, dtype=dt)) for _ in range(LAYERS)]
        table = torch.arange(1, blocks + 1, dtype=torch.int32, device=dev)[None]
        seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        q = torch.randn(1, hq, d, device=dev, dtype=dt)
        out = torch.empty_like(q)
        for splits in (1, 2, 4, 8, 16, 32, 64):
            t = graph_time(lambda: [paged_attention(q, kc, vc, out, table, seq_lens, qsl, 1, 1, d ** -0.5,  # noqa: B023
                                                    splits) for kc, vc in caches])  # noqa: B023
            result[f"attention ctx {ctx} splits {splits}"] = t / LAYERS * 1e6
            print(f"decode attention b1 ctx {ctx} splits {splits}: {t / LAYERS * 1e6:.1f} us per layer", flush=True)
        del caches
        torch.cuda.empty_cache()


def chain(result: dict) -> None:
    """A decode step's skinny matmuls and norms without attention: gemvs alone, with the residual
    add + RMSNorm launched between them (the layer-by-layer path), with the norms folded into the
    matmuls (LlamaDecoderLayer.forward_one_row)."""
    from sageinfer.ops.gemv import GATED_GEMV_CONFIG, GEMV_CONFIG
    from sageinfer.ops.rms_norm import rms_norm
    dev, dt = "cuda", torch.bfloat16
    layers = [{name: torch.randn(n, k, device=dev, dtype=dt) * 0.02 for name, (n, k, _) in SHAPES.items()
               if name != "lm_head"} for _ in range(LAYERS)]
    norm_w = torch.ones(4096, device=dev, dtype=dt)
    x0 = torch.randn(1, 4096, device=dev, dtype=dt)
    cfgs = {}

    def gemvs_only():
        x = x0
        for w in layers:
            qkv = gemv(x, w["qkv"], config=cfgs["plain"])
            h = gemv(qkv[:, :4096], w["o"], config=cfgs["plain"])
            gate_up = gemv(h, w["gate_up"], config=cfgs["plain"])
            x = gemv(gate_up, w["down (gated)"], gated=True, config=cfgs["gated"])
        return x

    def with_norm_kernels():
        x, residual = x0, x0.clone()
        for w in layers:
            h, residual = rms_norm(x, norm_w, 1e-6, residual)
            qkv = gemv(h, w["qkv"], config=cfgs["plain"])
            o = gemv(qkv[:, :4096], w["o"], config=cfgs["plain"])
            h, residual = rms_norm(o, norm_w, 1e-6, residual)
            gate_up = gemv(h, w["gate_up"], config=cfgs["plain"])
            x = gemv(gate_up, w["down (gated)"], gated=True, config=cfgs["gated"])
        return x

    def folded():
        residual = x0.clone()
        for w in layers:
            qkv = gemv(residual, w["qkv"], config=cfgs["plain"], norm_weight=norm_w, eps=1e-6)
            gemv(qkv[:, :4096], w["o"], config=cfgs["plain"], residual=residual)
            gate_up = gemv(residual, w["gate_up"], config=cfgs["plain"], norm_weight=norm_w, eps=1e-6)
            gemv(gate_up, w["down (gated)"], gated=True, config=cfgs["gated"], residual=residual)
        return residual

    nbytes = sum(w.numel() * 2 for layer in layers for w in layer.values())
    cfgs["plain"], cfgs["gated"] = GEMV_CONFIG, GATED_GEMV_CONFIG
    for name, fn in (("gemvs only", gemvs_only), ("norm kernels", with_norm_kernels), ("folded norms", folded)):
        for pdl in (False, True):
            with launch.dependent_launch(pdl):
                t = graph_time(fn)
            key = f"{name}, dependent launch {pdl}"
            result[key] = {"ms": t * 1e3, "tbs": nbytes / t / 1e12}
            print(f"{key}: {t * 1e3:.3f} ms ({nbytes / t / 1e12:.2f} TB/s)", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="attention,gemv,chain")
    args = parser.parse_args()
    result = {"gemv": {}, "attention": {}, "chain": {}}
    parts = args.parts.split(",")
    if "chain" in parts:
        chain(result["chain"])
    if "attention" in parts:
        tune_decode_attention(result["attention"])
    if "gemv" in parts:
        tune_gemv(result["gemv"])

    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
