"""P1's decode attention as the engine launches it (FP8 cache, cascade prefix, rotary and the new key's write
inside the decode kernel, the wide-batch tiles), split into what each part costs: the suffix kernel by suffix
length (a fixed cost a program against a cost a key tile), without rotary, and by
launch configuration. CUDA graphs over LAYERS layers whose caches are distinct tensors. Prints us a layer,
and each config's registers and shared memory (how many programs an SM holds).

  python benchmarks/experiments/probe_p1_suffix.py [--suffixes 24,88,152,280,408] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops import paged_attention as pa  # noqa: E402
from sageinfer.ops.cascade_attention import prefix_attention, prefix_splits  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this directory)

LAYERS, BATCH, HQ, HKV, D, PAGE, PREFIX = 8, 200, 32, 8, 128, 64, 1984
STORE = {0: torch.bfloat16, 1: torch.float8_e4m3fn}  # kv_mode: a bf16 or an FP8 cache
KV_MODE = 1
# (keys a tile, warps, stages). Register caps (maxnreg) were timed too and spilled (2026-12-06 results).
CONFIGS = [(32, 1, 2), (32, 1, 3), (32, 1, 4), (32, 2, 2), (64, 1, 2), (64, 2, 2), (64, 2, 3), (64, 4, 2),
           (16, 1, 3), (16, 1, 4)]
# The prefix kernel's tiles (rows, keys, warps, stages) at 1, 2 and 4 splits
PREFIX_CONFIGS = [(64, 64, 4, 3), (32, 64, 2, 3), (32, 64, 4, 3), (32, 32, 2, 3), (64, 32, 4, 3), (16, 64, 1, 3),
                  (128, 64, 8, 3)]


def build(suffix: int, dev: str):
    ctx = PREFIX + suffix  # keys after this step's new one
    pages = -(-ctx // PAGE)
    shared = PREFIX // PAGE
    own = pages - shared
    blocks = shared + BATCH * own
    table = torch.empty(BATCH, pages, dtype=torch.int32, device=dev)
    table[:, :shared] = torch.arange(shared, dtype=torch.int32, device=dev)
    table[:, shared:] = (shared + torch.randperm(BATCH * own, device=dev).to(torch.int32)).view(BATCH, own)
    layers = []
    for _ in range(LAYERS):
        k, v = ((torch.randn(blocks, PAGE, HKV, D, device=dev) * 0.5).to(STORE[KV_MODE]) for _ in range(2))
        layers.append((k, v))
    seq_lens = torch.full((BATCH,), ctx, dtype=torch.int32, device=dev)
    positions = (seq_lens - 1).long()
    slots = table.gather(1, (positions // PAGE).view(-1, 1).int()).view(-1).long() * PAGE + positions % PAGE
    qkv = torch.randn(BATCH, (HQ + 2 * HKV) * D, device=dev, dtype=torch.bfloat16)
    q = qkv[:, :HQ * D].view(BATCH, HQ, D)
    k_new = qkv[:, HQ * D:(HQ + HKV) * D].view(BATCH, HKV, D)
    v_new = qkv[:, (HQ + HKV) * D:].view(BATCH, HKV, D)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    freqs = torch.outer(torch.arange(8192, device=dev).float(), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    norm_w = torch.ones(D, device=dev, dtype=torch.bfloat16)
    rope = (positions, k_new, v_new, cos_sin, slots, norm_w, norm_w, 1e-6)
    return dict(layers=layers, table=table, seq_lens=seq_lens, q=q, rope=rope,
                qsl=torch.arange(BATCH + 1, dtype=torch.int32, device=dev),
                prefix_len=torch.tensor([PREFIX], dtype=torch.int32, device=dev), out=torch.empty_like(q),
                qr=q.contiguous())


def step(b, config, rotary=True, prefix_kernel=True, splits=None, prefix_config=None):
    """One layer after another: the prefix kernel (optional), then the suffix kernel."""
    splits = splits or prefix_splits(BATCH, HQ // HKV, HKV, 132)
    parts = {}

    def run():
        for i, (k, v) in enumerate(b["layers"]):
            rope = b["rope"] if rotary else None
            q = b["q"] if rotary else b["qr"]
            if prefix_kernel or i not in parts:
                prefix_rope = (rope[0], rope[3], rope[5], rope[7]) if rotary else None
                parts[i] = prefix_attention(q, k, v, b["table"][0], b["prefix_len"], D ** -0.5, splits,
                                            prefix_config, kv_mode=KV_MODE, rope=prefix_rope)
            prefix = (*parts[i], b["prefix_len"])
            pa.paged_attention(q, k, v, b["out"], b["table"], b["seq_lens"], b["qsl"], BATCH, 1, D ** -0.5, 1,
                               config=config, kv_mode=KV_MODE, prefix=prefix, rope=rope)
    return run


def kernel_resources():
    """Registers and shared memory of every compiled decode-kernel variant so far."""
    rows = []
    for key, kernel in pa._paged_attention_kernel.device_caches[0][0].items():
        meta = kernel.metadata
        rows.append({"n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "shared": meta.shared,
                     "num_warps": meta.num_warps, "num_stages": meta.num_stages})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suffixes", default="24,88,152,280,408")
    parser.add_argument("--no-sweep", action="store_true", help="no launch configs at 280 keys")
    parser.add_argument("--out")
    args = parser.parse_args()
    dev = "cuda"
    result = {"device": torch.cuda.get_device_name(), "rows": []}
    wide = pa.WIDE_DECODE_CONFIGS[1]
    print("| suffix keys | variant | us a layer |")
    for suffix in (int(s) for s in args.suffixes.split(",")):
        b = build(suffix, dev)
        variants = {"prefix + suffix (engine)": step(b, wide),
                    "suffix only": step(b, wide, prefix_kernel=False),
                    "suffix only, no rotary": step(b, wide, rotary=False, prefix_kernel=False)}
        if suffix == 280 and not args.no_sweep:
            for bn, w, st in CONFIGS:
                cfg = {"block_n": bn, "num_warps": w, "num_stages": st}
                variants[f"suffix only {bn}/{w}/{st}"] = step(b, cfg, prefix_kernel=False)
            for bm, bn, w, st in PREFIX_CONFIGS:
                for splits in (1, 2, 4):
                    cfg = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
                    variants[f"prefix {bm}/{bn}/{w}/{st} splits {splits} + suffix"] = step(b, wide, splits=splits,
                                                                                            prefix_config=cfg)
        for name, fn in variants.items():
            try:
                us = graph_time(fn) / LAYERS * 1e6
            except Exception as exc:  # noqa: BLE001  (a config the device cannot hold)
                print(f"| {suffix} | {name} | failed {type(exc).__name__}: {str(exc)[:80]} |", flush=True)
                continue
            print(f"| {suffix} | {name} | {us:.1f} |", flush=True)
            result["rows"].append({"suffix": suffix, "variant": name, "us": us})
        b = None
        torch.cuda.empty_cache()
    try:
        result["kernels"] = kernel_resources()
        for row in result["kernels"]:
            print(row)
    except Exception as exc:  # noqa: BLE001  (Triton's cache layout differs between versions)
        print(f"kernel resources unavailable: {exc}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
