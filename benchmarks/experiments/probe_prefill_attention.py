"""Prefill attention variants on the L2 prompt's chunks and on T1-like prompts: the per-key gather kernel
(pages of 16), the page-aligned kernel in several tile shapes with pointer loads or tensor descriptors
(TMA), and torch's SDPA backends on contiguous tensors as a reference for what this card allows.

  python benchmarks/experiments/probe_prefill_attention.py --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from kernels_util import random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.backend import LayerKVCache  # noqa: E402
from sageinfer.attention.torch_ref import paged_attention_ref  # noqa: E402
from sageinfer.ops.paged_attention import paged_attention  # noqa: E402
from sageinfer.ops.prefill_attention import prefill_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128
CASES = {"chunk 1: 16384 new": ([16384], [0]), "chunk 2: 15616 after 16384": ([15616], [16384]),
         "16 x 1024 new (T1)": ([1024] * 16, [0] * 16)}


def variants():
    yield "paged p16", 16, None
    for tma in (False, True):
        for bm, bn, warps, stages in ((128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (256, 64, 8, 3),
                                      (64, 32, 4, 3)):
            yield (f"tile {'tma' if tma else 'ptr'} m{bm} n{bn} w{warps} s{stages}", 128,
                   {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages, "use_tma": tma})


def run(fn, q, kc, vc, meta, cfg):
    out = torch.full_like(q, float("nan"))
    if fn is paged_attention:
        paged_attention(q, kc, vc, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                        meta.max_query_len, D ** -0.5, max_seq_len=meta.max_seq_len)
    else:
        prefill_attention(q, kc, vc, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                          meta.max_query_len, D ** -0.5, config=cfg)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    data = {}
    for page in (16, 128):
        for name, (ql, cl) in CASES.items():
            kc, vc, meta = random_paged_batch(ql, cl, HKV, D, page, torch.bfloat16, device="cuda", seed=3)
            q = torch.randn(sum(ql), HQ, D, device="cuda", dtype=torch.bfloat16)
            flops = sum(4 * n * (c + (n + 1) / 2) * HQ * D for n, c in zip(ql, cl))
            data[page, name] = (kc, vc, meta, q, flops)
        small = random_paged_batch([300, 1, 129], [256, 40, 0], HKV, D, page, torch.bfloat16, device="cuda")
        q_s = torch.randn(430, HQ, D, device="cuda", dtype=torch.bfloat16)
        ref = paged_attention_ref(q_s.double(), LayerKVCache(small[0].double(), small[1].double()), small[2],
                                  D ** -0.5)
        data[page, "check"] = (*small, q_s, ref)
    rows = []
    for label, page, cfg in variants():
        fn = paged_attention if cfg is None else prefill_attention
        try:
            kc, vc, meta, q_s, ref = data[page, "check"]
            err = rel_err(run(fn, q_s, kc, vc, meta, cfg), ref)
            rates = []
            for name in CASES:
                kc, vc, meta, q, flops = data[page, name]
                t = triton.testing.do_bench(lambda: run(fn, q, kc, vc, meta, cfg), warmup=20, rep=100,
                                            return_mode="median") * 1e-3
                rates.append(flops / t / 1e12)
            rows.append({"variant": label, "rel_err": err, "tflops": rates})
            print(f"{label:28s} err {err:.1e} " + " ".join(f"{r:6.0f}" for r in rates), flush=True)
        except Exception as exc:  # a configuration the compiler refuses on this chip
            rows.append({"variant": label, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"{label:28s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    # Reference: torch SDPA on contiguous tensors of chunk 1 (causal, no cached context).
    n = 16384
    q = torch.randn(1, HQ, n, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.bfloat16)
    flops = 4 * n * (n + 1) / 2 * HQ * D
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q, k, v, is_causal=True, enable_gqa=True)
                t = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median") * 1e-3
            rows.append({"variant": f"sdpa {backend.name} (contiguous)", "tflops": [flops / t / 1e12]})
            print(f"sdpa {backend.name:22s} {flops / t / 1e12:6.0f} (chunk 1 shape, contiguous)", flush=True)
        except Exception as exc:
            print(f"sdpa {backend.name} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
    report(rows, args.out)


def report(rows, out, label_columns=("variant",)):
    """A markdown table of the rows that ran (TFLOP/s per case), and the JSON record if out is given."""
    heads = [*label_columns, "rel err", *(f"{c} TFLOP/s" for c in CASES)]
    print("\n| " + " | ".join(heads) + " |")
    print("|" + " --- |" * len(heads))
    for r in rows:
        if "tflops" in r:
            cells = [str(r[c]) for c in label_columns] + [f"{r.get('rel_err', float('nan')):.1e}"]
            print("| " + " | ".join(cells + [f"{x:.0f}" for x in r["tflops"]]) + " |")
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
