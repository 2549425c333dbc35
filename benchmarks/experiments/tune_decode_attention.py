"""Sweep decode attention launch configs per KV cache dtype on the GPU (batch 256, context 600, and
batch 1, context 4096); prints GB/s of KV read per config and the best per dtype.

  python benchmarks/experiments/tune_decode_attention.py --out best_decode.json [--modes fp8,auto]
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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from kernels_util import random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.backend import KV_MODE, LayerKVCache  # noqa: E402
from sageinfer.attention.torch_ref import paged_attention_ref, write_kv_cache_ref  # noqa: E402
from sageinfer.ops.paged_attention import choose_num_splits, paged_attention  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402

NUM_SMS = get_platform().num_compute_units()

STORE = {"auto": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}
CASES = {"b256 ctx600": ([1] * 256, [600] * 256), "b1 ctx4096": ([1], [4095])}


def make_cache(k, v, mode):
    if mode == "auto":
        return LayerKVCache(k, v)
    scales = (lambda: torch.zeros(k.shape[:3], device="cuda")) if mode == "int8" else (lambda: None)
    cache = LayerKVCache(torch.empty(k.shape, dtype=STORE[mode], device="cuda"),
                         torch.empty(k.shape, dtype=STORE[mode], device="cuda"), mode, scales(), scales())
    slots = torch.arange(k.shape[0] * k.shape[1], device="cuda")
    write_kv_cache_ref(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:]), cache, slots)
    return cache


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--modes", default="auto,int8,fp8", help="cache dtypes to sweep, in this order")
    args = parser.parse_args()
    best = {}
    print("| dtype | block_n | warps | stages | rel err | " + " | ".join(f"{c} GB/s" for c in CASES) + " |")
    for mode in args.modes.split(","):
        data = []
        for name, (ql, cl) in CASES.items():
            k, v, meta = random_paged_batch(ql, cl, 8, 128, 16, torch.bfloat16, device="cuda", seed=2)
            cache = make_cache(k, v, mode)
            q = torch.randn(len(ql), 32, 128, device="cuda", dtype=torch.bfloat16)
            ref = paged_attention_ref(q.float(), cache, meta, 128 ** -0.5) if name.startswith("b1") else None
            elem = cache.k.element_size()
            nbytes = sum(cl) * 8 * 2 * (128 * elem + (4 if mode == "int8" else 0))
            data.append((name, cache, meta, q, ref, nbytes))
        rows = []
        for bn, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
            cfg = {"block_n": bn, "num_warps": warps, "num_stages": stages}
            try:
                res, err = [], None
                for name, cache, meta, q, ref, nbytes in data:
                    out = torch.empty_like(q)
                    splits = choose_num_splits(meta.num_seqs, 8, meta.max_seq_len, NUM_SMS)
                    fn = lambda: paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens,  # noqa
                                                 meta.query_start_loc, meta.num_seqs, 1, 128 ** -0.5, splits, cfg,
                                                 k_scale=cache.k_scale, v_scale=cache.v_scale,
                                                 kv_mode=KV_MODE[mode], fp8_scale=cache.fp8_scale)
                    fn()
                    if ref is not None:
                        err = rel_err(out, ref)
                    t = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
                    res.append(nbytes / t / 1e9)
                rows.append((cfg, err, res))
            except Exception as exc:  # resources exceeded for this config
                print(mode, cfg, "failed", type(exc).__name__)
        ok = [r for r in rows if r[1] is not None and r[1] < 3e-2]
        for cfg, err, res in sorted(ok, key=lambda r: -r[2][0])[:4]:
            print(f"| {mode} | {cfg['block_n']} | {cfg['num_warps']} | {cfg['num_stages']} | {err:.1e} | "
                  + " | ".join(f"{x:.0f}" for x in res) + " |")
        # weight the batch-256 case (throughput) and the batch-1 case (latency) equally
        best[KV_MODE[mode]] = max(ok, key=lambda r: r[2][0] / max(x[2][0] for x in ok)
                                  + r[2][1] / max(x[2][1] for x in ok))[0]
        print(mode, "best", best[KV_MODE[mode]], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(best, f)


if __name__ == "__main__":
    main()
