"""The Hopper prefill kernel in Gluon (sageinfer/platforms/hopper_attention.py, warp-specialised, used
by the engine for long prompts) in several configurations against the portable page-aligned kernel
(ops/prefill_attention.py) on the L2 prompt's two chunks and T1-like prompts, pages of 64 and 128
keys, after a correctness check against the torch reference with NaN in never-written cache slots.
The first, single-partition Gluon version (no warp specialisation) measured no faster than the
portable kernel and was removed (2026-11-24-h100-gluon-prefill-attention.json).

  python benchmarks/experiments/probe_hopper_attention.py --out results.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from kernels_util import poison_unwritten_slots, random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.backend import LayerKVCache  # noqa: E402
from sageinfer.attention.torch_ref import paged_attention_ref  # noqa: E402
from sageinfer.ops import prefill_attention as portable  # noqa: E402
from sageinfer.platforms import hopper_attention as hopper_ws  # noqa: E402

from probe_prefill_attention import CASES, D, HKV, HQ, report  # noqa: E402  (the same workloads and table)


def run(kind, q, kc, vc, meta, cfg=None):
    out = torch.full_like(q, float("nan"))
    args = (q, kc, vc, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
            meta.max_query_len, D ** -0.5)
    if kind == "ws":
        hopper_ws.prefill_attention(*args, config=cfg)
    else:
        portable.prefill_attention(*args, max_seq_len=meta.max_seq_len, tensor_copies=True, config=cfg)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--pages", default="64,128", help="KV page sizes to measure, comma-separated")
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for page in [int(p) for p in args.pages.split(",")]:
        kc, vc, meta = random_paged_batch([300, 1, 129, 64, 7], [256, 40, 0, 1000, 5000], HKV, D, page,
                                          torch.bfloat16, device="cuda", seed=1)
        poison_unwritten_slots(kc, vc, meta)
        q = torch.randn(int(meta.query_start_loc[-1]), HQ, D, device="cuda", dtype=torch.bfloat16)
        clean = [torch.nan_to_num(c) for c in (kc, vc)]
        ref = paged_attention_ref(q.double(), LayerKVCache(clean[0].double(), clean[1].double()), meta, D ** -0.5)
        variants = [(f"ws n{n} s{st} {'pingpong' if pp else 'free'}", "ws",
                     {"block_n": n, "stages": st, "pingpong": pp})
                    for n, st, pp in ((128, 2, True), (128, 2, False), (128, 3, True), (64, 4, True))]
        variants += [
                    ("portable tma m128 n128 w8 s2", "portable", dict(portable.LONG_TILE_CONFIG, use_tma=True)),
                    ("portable tma m64 n64 w4 s2", "portable", dict(portable.TILE_CONFIG, use_tma=True))]
        data = {}
        for name, (ql, cl) in CASES.items():
            kcb, vcb, mb = random_paged_batch(ql, cl, HKV, D, page, torch.bfloat16, device="cuda", seed=3)
            qb = torch.randn(sum(ql), HQ, D, device="cuda", dtype=torch.bfloat16)
            data[name] = (kcb, vcb, mb, qb, sum(4 * n * (c + (n + 1) / 2) * HQ * D for n, c in zip(ql, cl)))
        for label, kind, cfg in variants:
            if (kind == "portable" and page % cfg["block_n"]) or (
                    kind == "ws" and not hopper_ws.supports(page, D, HQ, HKV, torch.bfloat16, cfg)):
                continue
            try:
                err = rel_err(run(kind, q, kc, vc, meta, cfg), ref)
                rates = []
                for name, (kcb, vcb, mb, qb, flops) in data.items():
                    t = triton.testing.do_bench(lambda: run(kind, qb, kcb, vcb, mb, cfg), warmup=20, rep=100,  # noqa: B023
                                                return_mode="median") * 1e-3
                    rates.append(flops / t / 1e12)
                rows.append({"page": page, "variant": label, "rel_err": err, "tflops": rates})
                print(f"page {page:3d} {label:30s} err {err:.1e} " + " ".join(f"{r:6.0f}" for r in rates), flush=True)
            except Exception as exc:  # noqa: BLE001
                rows.append({"page": page, "variant": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(f"page {page} {label} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    report(rows, args.out, label_columns=("page", "variant"))


if __name__ == "__main__":
    main()
