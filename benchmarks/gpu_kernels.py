"""GPU check and timing of the Triton kernels against their torch references, in bf16.

  python benchmarks/gpu_kernels.py   (prints a table; needs a CUDA device)
"""
from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from kernels_util import random_paged_batch, rel_err  # noqa: E402
from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention.torch_ref import paged_attention_ref  # noqa: E402
from sageinfer.layers.norm import rms_norm_ref  # noqa: E402
from sageinfer.ops.paged_attention import choose_num_splits, paged_attention  # noqa: E402
from sageinfer.ops.rms_norm import rms_norm  # noqa: E402
from sageinfer.ops.activation import silu_and_mul  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402

NUM_SMS = get_platform().num_compute_units()

DEV, BF16 = "cuda", torch.bfloat16
COPY_GBS, MATMUL_TFLOPS = 3011.0, 750.0
rows = []


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def attention_case(name, query_lens, context_lens, check=True):
    hq, hkv, d, page = 32, 8, 128, 16
    kc, vc, meta = random_paged_batch(query_lens, context_lens, hkv, d, page, BF16, device=DEV, seed=1)
    for f in ("query_start_loc", "seq_lens", "block_table"):
        setattr(meta, f, getattr(meta, f).to(DEV))
    q = torch.randn(sum(query_lens), hq, d, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    splits = choose_num_splits(meta.num_seqs, hkv, meta.max_seq_len, NUM_SMS) if meta.max_query_len == 1 else 1
    run = lambda: paged_attention(q, kc, vc, out, meta.block_table, meta.seq_lens, meta.query_start_loc,  # noqa
                                  meta.num_seqs, meta.max_query_len, d ** -0.5, splits)
    run()
    err = None
    if check:
        ref = paged_attention_ref(q.float(), LayerKVCache(kc.float(), vc.float()), meta, d ** -0.5)
        err = rel_err(out, ref)
    t = bench(run)
    kv_bytes = sum(s for s in meta.seq_lens_cpu) * hkv * d * 2 * 2
    flops = sum(4 * q_len * (c + (q_len + 1) / 2) * hq * d for q_len, c in zip(query_lens, context_lens))
    rows.append((f"attn {name} (splits {splits})", err, t * 1e6,
                 f"{kv_bytes / t / 1e9:.0f} GB/s ({100 * kv_bytes / t / 1e9 / COPY_GBS:.0f}%), "
                 f"{flops / t / 1e12:.0f} TFLOP/s ({100 * flops / t / 1e12 / MATMUL_TFLOPS:.0f}%)"))


def main():
    attention_case("decode b1 ctx768", [1], [767])
    attention_case("decode b1 ctx32k", [1], [32000])
    attention_case("decode b256 ctx600", [1] * 256, [600] * 256)
    attention_case("decode b256 ctx1100", [1] * 256, [1100] * 256)
    attention_case("prefill 1x1024", [1024], [0])
    attention_case("prefill 16x1024", [1024] * 16, [0] * 16, check=False)
    attention_case("prefill chunk 8192 after 24k", [8192], [24000], check=False)
    attention_case("mixed 4x1024 + 200 decodes", [1024] * 4 + [1] * 200, [0] * 4 + [700] * 200, check=False)
    for tokens in (1, 256, 8192):
        x, r = torch.randn(tokens, 4096, device=DEV, dtype=BF16), torch.randn(tokens, 4096, device=DEV, dtype=BF16)
        w = torch.rand(4096, device=DEV, dtype=BF16)
        out, _ = rms_norm(x, w, 1e-6, r)
        err = rel_err(out, rms_norm_ref((x + r), w, 1e-6))
        t = bench(lambda: rms_norm(x, w, 1e-6, r))
        tref = bench(lambda: rms_norm_ref(x + r, w, 1e-6))
        nbytes = tokens * 4096 * 2 * 4
        rows.append((f"add+rmsnorm {tokens}x4096", err, t * 1e6,
                     f"{nbytes / t / 1e9:.0f} GB/s ({100 * nbytes / t / 1e9 / COPY_GBS:.0f}%), torch {tref * 1e6:.1f} us"))
        g = torch.randn(tokens, 2 * 12288, device=DEV, dtype=BF16)
        ref = torch.nn.functional.silu(g[:, :12288].float()) * g[:, 12288:].float()
        err = rel_err(silu_and_mul(g), ref)
        t = bench(lambda: silu_and_mul(g))
        nbytes = tokens * 12288 * 2 * 3
        rows.append((f"silu_and_mul {tokens}x12288", err, t * 1e6,
                     f"{nbytes / t / 1e9:.0f} GB/s ({100 * nbytes / t / 1e9 / COPY_GBS:.0f}%)"))
    print("\n| kernel | rel err vs torch | median us | achieved |")
    print("| --- | --- | --- | --- |")
    for name, err, us, note in rows:
        print(f"| {name} | {'-' if err is None else f'{err:.1e}'} | {us:.1f} | {note} |")


if __name__ == "__main__":
    main()
