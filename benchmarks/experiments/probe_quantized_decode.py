"""Decode attention over bf16, FP8 and INT8 caches by launch config: where a quantised cache (half the
bytes) loses to bf16. Qwen3-8B shapes (32 query heads, 8 KV heads, head dim 128, pages of 64), a CUDA
graph over LAYERS layers whose K and V caches are all distinct tensors (so no tile is read from L2),
for a chat-like decode batch, a mid-length one and one long sequence. Prints microseconds per layer and
the cache bytes streamed per second (values and INT8 scales).

  python benchmarks/experiments/probe_quantized_decode.py [--modes auto,int8] [--configs 64:2:2,3] [--cases 128x1024]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


from sageinfer.attention.backend import new_kv_scales  # noqa: E402
from sageinfer.ops import paged_attention as pa  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this directory: the script's own)

LAYERS, HQ, HKV, D, PAGE = 16, 32, 8, 128, 64
CASES = ((256, 640, None), (64, 4096, None), (1, 32768, 32), (1, 32768, 64))
STORE = {"auto": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
MODE = {"auto": 0, "fp8": 1, "int8": 2}


def make_layer(mode: str, blocks: int, dev: str):
    if mode == "int8":
        k, v = (torch.randint(-127, 128, (blocks, PAGE, HKV, D), device=dev, dtype=torch.int8) for _ in range(2))
        scales = [new_kv_scales(blocks, PAGE, HKV, dev).uniform_(0.001, 0.01) for _ in range(2)]
        return k, v, *scales
    k, v = ((torch.randn(blocks, PAGE, HKV, D, device=dev) * 0.5).to(STORE[mode]) for _ in range(2))
    return k, v, None, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="auto,fp8,int8")
    parser.add_argument("--configs", default="32,64,128:2,4:2,3,4", help="block_n list:warps list:stages list")
    parser.add_argument("--cases", default="", help="batch x keys to run instead of CASES, e.g. 128x1024,192x1024 "
                                                    "(splits as the plan chooses them)")
    args = parser.parse_args()
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = [[int(x) for x in part.split(",")] for part in args.configs.split(":")]
    configs = [{"block_n": bn, "num_warps": w, "num_stages": st} for bn, w, st in itertools.product(*grids)]
    print("| case | cache | block_n | warps | stages | us/layer | TB/s |")
    cases = [(*map(int, case.split("x")), None) for case in args.cases.split(",")] if args.cases else CASES
    for batch, keys, splits in cases:
        pages = -(-keys // PAGE)
        blocks = batch * pages
        table = torch.randperm(blocks, device=dev).to(torch.int32).view(batch, pages)
        seq_lens = torch.full((batch,), keys, dtype=torch.int32, device=dev)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        splits = splits or pa.choose_num_splits(batch, HKV, keys, sms)
        case = f"{batch}x{keys} s{splits}"
        for mode in args.modes.split(","):
            layers = [make_layer(mode, blocks, dev) for _ in range(LAYERS)]
            per_key = HKV * 2 * (D * STORE[mode].itemsize + (4 if mode == "int8" else 0))
            nbytes = batch * keys * per_key
            out = torch.empty_like(q)
            best = None
            for cfg in configs:
                try:
                    t = graph_time(lambda: [pa.paged_attention(  # noqa: B023
                        q, k, v, out, table, seq_lens, qsl, batch, 1, D ** -0.5, splits, cfg,  # noqa: B023
                        k_scale=ks, v_scale=vs, kv_mode=MODE[mode]) for k, v, ks, vs in layers])  # noqa: B023
                except Exception as exc:  # resources exceeded for this config
                    print(f"| {case} | {mode} | {cfg} failed: {type(exc).__name__}")
                    continue
                us = t / LAYERS * 1e6
                print(f"| {case} | {mode} | {cfg['block_n']} | {cfg['num_warps']} | {cfg['num_stages']} | "
                      f"{us:.1f} | {nbytes / (us * 1e-6) / 1e12:.2f} |", flush=True)
                if best is None or us < best[0]:
                    best = (us, cfg)
            print(f"BEST {case} {mode}: {best[0]:.1f} us {best[1]}  (default {pa.DECODE_CONFIG[MODE[mode]]})",
                  flush=True)
            layers = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
