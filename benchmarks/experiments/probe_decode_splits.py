"""Decode attention as the engine plans it (Qwen3-8B shapes: 32 query / 8 KV heads, head dim 128, pages of
64), one layer in a CUDA graph, on the GPU: the current kernel with 1, 4 and 32 heads a merge program
(SAGEINFER_MERGE_HEADS) against a baseline copy of ops/paged_attention.py (an earlier commit's: the split
count a constant of the compile). Prints microseconds per case and variant and the error against the
reference.

  git show 106e967:sageinfer/ops/paged_attention.py > pa_old_106e967.py   (here: it travels with the tree)
  python benchmarks/experiments/probe_decode_splits.py --baseline pa_old_106e967.py [--kv-cache-dtype auto|fp8|int8]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from kernels_util import rel_err  # noqa: E402
from sageinfer.attention.backend import AttentionMetadata  # noqa: E402
from sageinfer.attention.triton_backend import TritonBackend  # noqa: E402
from sageinfer.ops import paged_attention as current  # noqa: E402
from probe_ragged_decode import chat_like, decode_case  # noqa: E402

CASES = {
    "1 x 1,000": [1000],
    "1 x 8,000": [8000],
    "1 x 32,000": [32000],
    "8 x 2,000": [2000] * 8,
    "chat-like x64": chat_like(64, 2),
    "chat-like x384": chat_like(384, 1),
    "chat-like x559": chat_like(559, 4),
    "uniform 256 x 1,100": [1100] * 256,
}


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("baseline_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="an earlier commit's ops/paged_attention.py")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"])
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    backend = TritonBackend()
    variants = [("baseline", baseline, None)] + [(f"merge heads {h}", current, h) for h in (1, 4, 32)]
    print("| case | plan (splits, least keys) | " + " | ".join(f"{label} us" for label, *_ in variants) +
          f" | rel err |  (KV cache {args.kv_cache_dtype})")
    print("| --- | --- | " + " | ".join("---" for _ in variants) + " | --- |")
    for name, lens in CASES.items():
        meta, cache, q, ref = decode_case(lens, args.kv_cache_dtype)
        plan = AttentionMetadata(0, None, None, None, None, max_query_len=1, max_seq_len=max(lens),
                                 query_start_loc_cpu=[], seq_lens_cpu=lens)
        backend.plan(plan, 8)
        times, worst = [], 0.0
        for label, module, heads in variants:
            if heads is not None:
                module.MERGE_HEADS = heads
            out = torch.empty_like(q)

            def run():
                module.paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens,
                                       meta.query_start_loc, len(lens), 1, 128 ** -0.5, plan.num_splits,
                                       max_seq_len=max(lens), k_scale=cache.k_scale, v_scale=cache.v_scale,
                                       kv_mode=cache.mode, fp8_scale=cache.fp8_scale,
                                       min_split_keys=plan.min_split_keys)
            run()
            worst = max(worst, rel_err(out.float(), ref))
            times.append(1e3 * triton.testing.do_bench_cudagraph(run, rep=100))
        print(f"| {name} | {plan.num_splits}, {plan.min_split_keys} | " + " | ".join(f"{t:.1f}" for t in times) +
              f" | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
