"""Attention of a serving-like mixed step (one 1,024-token prefill chunk beside many decodes) on the
GPU, and the host time of one launch: per-key gather kernel against the page-aligned kernel with
pointer loads or tensor descriptors (whose launch encodes two descriptors on the host).

  python benchmarks/experiments/probe_mixed_step_attention.py
"""
from __future__ import annotations

import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from kernels_util import random_paged_batch  # noqa: E402
from sageinfer.ops.paged_attention import paged_attention  # noqa: E402
from sageinfer.ops.prefill_attention import prefill_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128


def main():
    cases = {"1 x 1024 prefill + 64 decodes at ~1000": ([1024] + [1] * 64, [0] + [1000 + i for i in range(64)]),
             "1 x 256 chunk after 768 + 128 decodes": ([256] + [1] * 128, [768] + [900 + i for i in range(128)]),
             "1 x 1024 prefill alone": ([1024], [0])}
    print("| case | kernel | GPU us | host us per launch |\n| --- | --- | --- | --- |")
    for name, (ql, cl) in cases.items():
        kc, vc, meta = random_paged_batch(ql, cl, HKV, D, 64, torch.bfloat16, device="cuda", seed=1)
        q = torch.randn(sum(ql), HQ, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kernels = {
            "paged (gather)": lambda: paged_attention(q, kc, vc, out, meta.block_table, meta.seq_lens,
                                                      meta.query_start_loc, meta.num_seqs, meta.max_query_len,
                                                      D ** -0.5, max_seq_len=meta.max_seq_len),
            "tile ptr": lambda: prefill_attention(q, kc, vc, out, meta.block_table, meta.seq_lens,
                                                  meta.query_start_loc, meta.num_seqs, meta.max_query_len, D ** -0.5,
                                                  max_seq_len=meta.max_seq_len, config={"use_tma": False}),
            "tile tma": lambda: prefill_attention(q, kc, vc, out, meta.block_table, meta.seq_lens,
                                                  meta.query_start_loc, meta.num_seqs, meta.max_query_len, D ** -0.5,
                                                  max_seq_len=meta.max_seq_len, config={"use_tma": True}),
        }
        for label, fn in kernels.items():
            gpu = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e3
            torch.cuda.synchronize()
            n = 200
            t = time.perf_counter()
            for _ in range(n):
                fn()
            host = (time.perf_counter() - t) / n * 1e6
            torch.cuda.synchronize()
            print(f"| {name} | {label} | {gpu:.1f} | {host:.1f} |", flush=True)


if __name__ == "__main__":
    main()
