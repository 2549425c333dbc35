"""Decode attention for one sequence at 64K and 128K keys (Llama-3.1-8B shapes: 32 query heads, 8 KV
heads, head dim 128, pages of 64), by split count and key-tile configuration. Each timing replays a
CUDA graph over 32 layers with caches of their own, so L2 holds nothing between layers, the way a
decode step runs it. A device-to-device copy of one layer's cache gives the bandwidth ceiling.

  python benchmarks/experiments/tune_long_decode.py --out result.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.paged_attention import DECODE_CONFIG, choose_num_splits, paged_attention  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this directory: the script's own)

LAYERS, HQ, HKV, D, PAGE = 32, 32, 8, 128, 64
CONFIGS = [{"block_n": bn, "num_warps": w, "num_stages": s}
           for bn, w, s in ((64, 2, 3), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 4, 2), (128, 8, 3), (32, 2, 4))]
SPLITS = (16, 32, 64, 128, 256)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "rows": []}
    for ctx in (65536, 131072):
        blocks = ctx // PAGE
        caches = [(torch.randn(blocks, PAGE, HKV, D, device=dev, dtype=dt),
                   torch.randn(blocks, PAGE, HKV, D, device=dev, dtype=dt)) for _ in range(LAYERS)]
        nbytes = 2 * caches[0][0].numel() * 2 * LAYERS
        table = torch.randperm(blocks, device=dev).to(torch.int32)[None]
        seq_lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
        qsl = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        q = torch.randn(1, HQ, D, device=dev, dtype=dt)
        out = torch.empty_like(q)
        scratch = torch.empty_like(caches[0][0])
        copy_t = graph_time(lambda: [scratch.copy_(k) for k, _ in caches]) / LAYERS  # noqa: B023
        ceiling = 2 * caches[0][0].numel() * 2 / copy_t  # read + write of one layer's K
        print(f"ctx {ctx}: copy ceiling {ceiling / 1e12:.2f} TB/s; default splits "
              f"{choose_num_splits(1, HKV, ctx, sms)}, default config {DECODE_CONFIG[0]}", flush=True)
        ref = None
        for cfg in CONFIGS:
            for splits in SPLITS:
                try:
                    t = graph_time(lambda: [paged_attention(q, k, v, out, table, seq_lens, qsl, 1, 1, D ** -0.5,  # noqa: B023
                                                            splits, config=cfg) for k, v in caches])  # noqa: B023
                except Exception as exc:  # noqa: BLE001  (a tile over the device's resources)
                    print(f"  {cfg} splits {splits}: {type(exc).__name__}", flush=True)
                    continue
                got = out.float().clone()
                ref = got if ref is None else ref
                err = (got - ref).abs().max().item()
                row = {"ctx": ctx, "splits": splits, **cfg, "us_per_layer": t / LAYERS * 1e6,
                       "tbs": nbytes / t / 1e12, "max_diff_to_first": err}
                result["rows"].append(row)
                print(f"  {cfg} splits {splits:3d}: {row['us_per_layer']:7.1f} us/layer {row['tbs']:.2f} TB/s "
                      f"(diff {err:.1e})", flush=True)
        best = min((r for r in result["rows"] if r["ctx"] == ctx), key=lambda r: r["us_per_layer"])
        print(f"ctx {ctx} best: {best}", flush=True)
        caches = scratch = None
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
