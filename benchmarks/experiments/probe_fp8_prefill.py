"""Short-prompt prefill attention over an FP8 cache, through the engine's own entry points and default tiles:
the page-tiled kernel on a bf16 cache (the bar), on the FP8 cache (values widened per tile in registers,
what a step runs now), and the step's pages widened to bf16 first (attention/triton_backend's
widened_pages, as long prompts do) then the bf16 kernel, the widening timed with it; on Hopper also the
platform's warp-specialised kernel (platforms/hopper_attention.py, now taken for long prompts only) on the
bf16 cache and on the widened pages. Cases: T1's mixed
step (16 new prompts of 1,024) and P1's (75 prompts of 200 after 2,000 cached tokens). Prints us a layer
and TFLOP/s, and each FP8 path's error against the bf16 cache's output.

  python benchmarks/experiments/probe_fp8_prefill.py            (a CUDA GPU)
  python benchmarks/experiments/probe_fp8_prefill.py --small    (CPU, Triton interpreter: the paths run)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels_util import random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.backend import LayerKVCache  # noqa: E402
from sageinfer.attention.triton_backend import widened_pages  # noqa: E402
from sageinfer.ops.prefill_attention import prefill_attention  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
if HOPPER:
    from sageinfer.platforms import hopper_attention  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 64
CASES = {"T1 mixed: 16 x 1024 new": ([1024] * 16, [0] * 16),
         "P1 mixed: 75 x 200 after a shared 2000": ([200] * 75, [2000] * 75),
         "chat: 12 new prompts of 100-2000": ([100, 2000, 350, 800, 1500, 120, 600, 900, 250, 1800, 450, 1100],
                                              [0] * 12),
         "chunk: 2 x 2048 after 2048": ([2048] * 2, [2048] * 2)}
SMALL = {"2 x 64 new": ([64] * 2, [0] * 2), "2 x 32 after 64": ([32] * 2, [64] * 2)}


def attend(q, k_cache, v_cache, meta, kv_scale=1.0, block_table=None, kernel=None):
    out = torch.empty_like(q)
    if kernel is not None:
        return kernel(q, k_cache, v_cache, out, meta.block_table if block_table is None else block_table,
                      meta.seq_lens, meta.query_start_loc, meta.num_seqs, meta.max_query_len, D ** -0.5)
    return prefill_attention(q, k_cache, v_cache, out, meta.block_table if block_table is None else block_table,
                             meta.seq_lens, meta.query_start_loc, meta.num_seqs, meta.max_query_len, D ** -0.5,
                             max_seq_len=meta.max_seq_len, kv_scale=kv_scale)


def widened(q, cache, meta, kernel=None):
    # the page list is built once a step (meta.packed_pages: kept here after the first call), each
    # layer widens its own pages
    k, v, table = widened_pages(cache, meta, q.dtype)
    return attend(q, k, v, meta, block_table=table, kernel=kernel)


def seconds(fn, reps: int) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e-3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="tiny cases (the CPU interpreter)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter's bf16 arithmetic is wrong
    for name, (query_lens, context_lens) in (SMALL if args.small else CASES).items():
        k16, v16, meta = random_paged_batch(query_lens, context_lens, HKV, D, PAGE, dtype, device=device, seed=1)
        if "shared" in name:  # every sequence reads the first one's prefix pages, as prefix caching makes them
            shared = context_lens[0] // PAGE
            meta.block_table[:, :shared] = meta.block_table[0, :shared]
        meta.block_table_cpu = meta.block_table.cpu().numpy()  # an eager step's: shared pages widened once
        k16, v16 = k16 * 0.5, v16 * 0.5
        cache = LayerKVCache(k16.to(torch.float8_e4m3fn), v16.to(torch.float8_e4m3fn), "fp8")
        # the bar reads the FP8 values widened, so that the three paths attend to the same keys
        k16, v16 = cache.k.to(dtype), cache.v.to(dtype)
        q = torch.randn(sum(query_lens), HQ, D, device=device, dtype=dtype)
        flops = sum(4 * n * (c + (n + 1) / 2) * HQ * D for n, c in zip(query_lens, context_lens))
        paths = {"bf16 cache": lambda: attend(q, k16, v16, meta),
                 "fp8 cache, tiles widened in registers": lambda: attend(q, cache.k, cache.v, meta),
                 "fp8 cache, pages widened first": lambda: widened(q, cache, meta)}
        if HOPPER:
            kernel = hopper_attention.prefill_attention
            paths["Hopper kernel, bf16 cache"] = lambda: attend(q, k16, v16, meta, kernel=kernel)
            paths["Hopper kernel, fp8 pages widened first"] = lambda: widened(q, cache, meta, kernel=kernel)
        bar = paths["bf16 cache"]()
        print(f"== {name}: {flops / 1e9:.1f} GFLOP a layer")
        for label, fn in paths.items():
            err = rel_err(fn(), bar)
            t = seconds(fn, 20)
            print(f"{label:40s} {t * 1e6:8.1f} us  {flops / t / 1e12:6.0f} TFLOP/s  err {err:.1e}", flush=True)
        t = seconds(lambda: widened_pages(cache, meta, q.dtype), 20)
        print(f"{'(the widening alone)':40s} {t * 1e6:8.1f} us  {meta.packed_pages[0].numel()} pages", flush=True)


if __name__ == "__main__":
    main()
