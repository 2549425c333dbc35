"""Decode attention of batches whose sequences differ in length, one layer (Qwen3-8B shapes: 32 query /
8 KV heads, head dim 128; pages of 64 tokens, the engine's CUDA default), on the GPU: no split-KV (what
a large batch gets today) against splits of at least N keys (SAGEINFER_RAGGED_DECODE_SPLITS). Prints
microseconds and GB/s of KV read per case and variant, and the error against the reference.

  python benchmarks/experiments/probe_ragged_decode.py [--kv-cache-dtype auto|fp8|int8]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from kernels_util import DEVICE, random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.torch_ref import paged_attention_ref  # noqa: E402
from sageinfer.ops.paged_attention import paged_attention  # noqa: E402
from tune_decode_attention import make_cache  # noqa: E402


def chat_like(n: int, seed: int) -> list[int]:
    """Contexts of a conversation mix part-way through its answers (sageinfer/bench/mixed.py's chat-mix)."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(700), 1.0, n), 16, 8192)
    answered = np.clip(rng.lognormal(np.log(200), 0.8, n), 8, 1024) * rng.random(n)
    return np.rint(prompts + answered).astype(int).tolist()


def decode_case(lens: list[int], kv_cache_dtype: str):
    """One decode token a sequence of these lengths (Qwen3-8B's heads, pages of 64), its cache in the given
    dtype, and the reference output: (meta, cache, q, ref)."""
    k, v, meta = random_paged_batch([1] * len(lens), [n - 1 for n in lens], 8, 128, 64, torch.bfloat16,
                                    device=DEVICE, seed=3)
    cache = make_cache(k, v, kv_cache_dtype)
    q = torch.randn(len(lens), 32, 128, device=DEVICE, dtype=torch.bfloat16)
    return meta, cache, q, paged_attention_ref(q.float(), cache, meta, 128 ** -0.5)


CASES = {
    "chat-like x128": chat_like(128, 0),
    "chat-like x384": chat_like(384, 1),
    "uniform 256 x 1100": [1100] * 256,
    "127 x 500 + 1 x 16000": [500] * 127 + [16000],
}
VARIANTS = [("no split", 1, 0)] + [(f"{s} splits >= {k}", s, k) for s in (4, 8, 16) for k in (512, 1024, 2048)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"])
    args = parser.parse_args()
    print(f"| case | variant | us | GB/s | rel err |  (KV cache {args.kv_cache_dtype})")
    print("| --- | --- | --- | --- | --- |")
    for name, lens in CASES.items():
        meta, cache, q, ref = decode_case(lens, args.kv_cache_dtype)
        nbytes = sum(lens) * 8 * 2 * 128 * cache.k.element_size()
        for label, splits, min_keys in VARIANTS:
            out = torch.empty_like(q)

            def run():
                paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                                len(lens), 1, 128 ** -0.5, splits, max_seq_len=max(lens), k_scale=cache.k_scale,
                                v_scale=cache.v_scale, kv_mode=cache.mode, fp8_scale=cache.fp8_scale,
                                min_split_keys=min_keys)
            run()
            err = rel_err(out.float(), ref)
            us = 1e3 * triton.testing.do_bench(run, warmup=10, rep=50)
            print(f"| {name} | {label} | {us:.1f} | {nbytes / us / 1e3:.0f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
