"""Where P1 (shared 2,000-token prefix, 200 requests) spends its time.

  python benchmarks/experiments/probe_p1.py [--skip-engine]

A: decode attention for 200 sequences of 2,264 tokens whose first 31 pages of 64 are the same physical
   blocks (as prefix caching leaves them) vs all-distinct blocks, and the cascade kernels (prefix
   attended once, 1,920 tokens) by tile configuration and KV splits, the suffix kernel timed alone too;
   over a bf16 and an FP8 cache (--kv).
B: the P1 workload end to end with 1 output token (prefill part) and with 128 (the whole thing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.cascade_attention import PREFIX_ALIGN, prefix_attention, prefix_splits
from sageinfer.ops.paged_attention import paged_attention
from sageinfer.platforms import get_platform  # noqa: E402

NUM_SMS = get_platform().num_compute_units()


def attention_probe(batch=200, ctx=2264, page=64, hq=32, hkv=8, d=128, kv="auto", shared_len=2000):
    """kv: "auto" (a bf16 cache) or "fp8" (e4m3 values, scale 1). Pages of 64 as the engine's, so the
    cascade's prefix is its: the shared prefix's whole pages, in multiples of PREFIX_ALIGN."""
    dev, dt = "cuda", torch.bfloat16
    kv_mode = {"auto": 0, "fp8": 1}[kv]
    per_seq = -(-ctx // page)
    prefix_blocks = shared_len // page
    num_blocks = 1 + batch * per_seq
    kc = torch.randn(num_blocks, page, hkv, d, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    if kv == "fp8":
        kc, vc = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    q = torch.randn(batch, hq, d, device=dev, dtype=dt)
    out = torch.empty_like(q)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    distinct = (1 + torch.arange(batch * per_seq, dtype=torch.int32, device=dev)).view(batch, per_seq)
    shared = distinct.clone()
    shared[:, :prefix_blocks] = distinct[0, :prefix_blocks]
    rows = {}
    for name, table in (("distinct", distinct), ("shared-prefix", shared)):
        def run(table=table):
            paged_attention(q, kc, vc, out, table, seq_lens, qsl, batch, 1, d ** -0.5, 1, kv_mode=kv_mode)
        t = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") * 1e-3
        kv_bytes = batch * ctx * hkv * d * 2 * kc.element_size()
        rows[name] = {"us": t * 1e6, "logical_gbs": kv_bytes / t / 1e9}
        print(f"decode attention {kv} b{batch} ctx{ctx} {name}: {t * 1e6:.0f} us, "
              f"{kv_bytes / t / 1e9:.0f} GB/s logical")
    ref = out.clone()
    prefix_len = torch.tensor([prefix_blocks * page // PREFIX_ALIGN * PREFIX_ALIGN], dtype=torch.int32, device=dev)
    configs = [{"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
               for bm, bn, w, st in ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                                     (64, 128, 4, 2), (128, 32, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3))]
    for cfg in configs:
        default = prefix_splits(batch, hq // hkv, hkv, NUM_SMS, block_m=cfg["block_m"])
        for splits in sorted({default, 1, 2, 4, 8}):
            def suffix(parts):
                paged_attention(q, kc, vc, out, shared, seq_lens, qsl, batch, 1, d ** -0.5, 1,
                                prefix=(*parts, prefix_len), kv_mode=kv_mode)

            def cascade(cfg=cfg, splits=splits):
                suffix(prefix_attention(q, kc, vc, shared[0], prefix_len, d ** -0.5, splits, cfg, kv_mode=kv_mode))
            try:
                cascade()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = triton.testing.do_bench(cascade, warmup=25, rep=200, return_mode="median") * 1e-3
                parts = prefix_attention(q, kc, vc, shared[0], prefix_len, d ** -0.5, splits, cfg, kv_mode=kv_mode)
                t_suffix = triton.testing.do_bench(lambda: suffix(parts), warmup=25, rep=200,  # noqa: B023
                                                   return_mode="median") * 1e-3
            except Exception as exc:  # noqa: BLE001  (a tile shape the device cannot hold)
                print(f"cascade {cfg} splits {splits}: failed {type(exc).__name__}")
                continue
            mark = " (default splits)" if splits == default else ""
            rows[f"cascade {cfg} splits {splits}"] = {"us": t * 1e6, "suffix_us": t_suffix * 1e6,
                                                      "rel_err_vs_plain": err}
            print(f"cascade {kv} {cfg} splits {splits}{mark}: {t * 1e6:.0f} us (suffix {t_suffix * 1e6:.0f}), "
                  f"rel err vs plain {err:.1e}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--kv", default="auto,fp8", help="cache dtypes of the attention probe")
    args = parser.parse_args()
    result = {f"attention {kv}": attention_probe(kv=kv) for kv in args.kv.split(",")}
    if not args.skip_engine:
        from sageinfer import LLM
        from sageinfer.bench.runs import run_throughput
        from sageinfer.bench.workloads import STANDARD_DIR, load_workloads
        llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
                  max_num_seqs=1024, max_num_batched_tokens=16384)
        run_throughput(llm, {"seed": 99, "num_prompts": 8, "input_len": 300, "output_len": 8}, use_tqdm=False)
        w = dict(load_workloads()["P1-shared-prefix"])
        for out_len, seed in ((1, 40), (128, 41), (128, 4)):
            w.update(output_len=out_len, seed=seed)  # a fresh prefix each time: nothing cached from before
            stats0 = llm.engine.num_prompt_tokens_computed
            t = time.perf_counter()
            r = run_throughput(llm, w, use_tqdm=False)
            r["wall_s"] = time.perf_counter() - t
            r["prompt_tokens_computed"] = llm.engine.num_prompt_tokens_computed - stats0
            print(f"P1 output_len {out_len} seed {seed}: {r['seconds']:.3f} s, {r['total_tok_s']:.0f} tok/s, "
                  f"prompt tokens computed {r['prompt_tokens_computed']}", flush=True)
            result[f"p1_out{out_len}_seed{seed}"] = r
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
