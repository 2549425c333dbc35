"""Decode attention over a bf16 cache, and over an INT8 cache with its scales token-major ([blocks, page,
KV heads]) and head-major ([blocks, KV heads, page], the default since 22f8766): a batch of 256
sequences of 640 keys (a chat mix's decode step) and one sequence of 32K keys, Qwen3-8B shapes (32
query heads, 8 KV heads, head dim 128, pages of 64), a CUDA graph over 36 layers with caches of their
own. Prints microseconds per layer (the layouts' equality is tested in
tests/test_ops_paged_attention.py).

  python benchmarks/experiments/probe_int8_scale_layout.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.attention.backend import new_kv_scales  # noqa: E402
from sageinfer.ops.paged_attention import choose_num_splits, paged_attention  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this directory: the script's own)

LAYERS, HQ, HKV, D, PAGE = 36, 32, 8, 128, 64


def main() -> None:
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, keys in ((256, 640), (1, 32768)):
        pages = -(-keys // PAGE)
        blocks = batch * pages
        table = torch.randperm(blocks, device=dev).to(torch.int32).view(batch, pages)
        seq_lens = torch.full((batch,), keys, dtype=torch.int32, device=dev)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        splits = choose_num_splits(batch, HKV, keys, sms)
        times = {}
        for layout in ("bf16", "int8 token-major", "int8 head-major"):
            layers = []
            for _ in range(LAYERS):
                if layout == "bf16":
                    layers.append((torch.randn(blocks, PAGE, HKV, D, device=dev, dtype=torch.bfloat16),) * 2
                                  + (None, None, 0))
                    continue
                k, v = (torch.randint(-127, 128, (blocks, PAGE, HKV, D), device=dev, dtype=torch.int8)
                        for _ in range(2))
                scales = [torch.rand(blocks, PAGE, HKV, device=dev) / 100 for _ in range(2)]
                if layout.endswith("head-major"):
                    scales = [new_kv_scales(blocks, PAGE, HKV, dev).copy_(s) for s in scales]
                layers.append((k, v, *scales, 2))
            out = torch.empty_like(q)
            t = graph_time(lambda: [paged_attention(q, k, v, out, table, seq_lens, qsl, batch, 1, D ** -0.5,  # noqa: B023
                                                    splits, k_scale=ks, v_scale=vs, kv_mode=mode)
                                    for k, v, ks, vs, mode in layers])  # noqa: B023
            times[layout] = t / LAYERS * 1e6
            layers = None
            torch.cuda.empty_cache()
        print(f"batch {batch} x {keys} keys, {splits} split(s): " +
              ", ".join(f"{name} {us:.1f} us" for name, us in times.items()), flush=True)


if __name__ == "__main__":
    main()
