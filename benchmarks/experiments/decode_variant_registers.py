"""Decode attention's compiles, registers and spills for sm_90, counted on a machine without a GPU: each
launch the engine's plans make (the three cache dtypes x rotary inside or not x no split / 8 splits /
8 ragged splits of at least 1,024 keys / 32 splits, and the wide 8-bit tiles) is intercepted and compiled
for sm_90 (sass_loop.compile_launch), and launches that compile to the same cubin are counted once.

  python benchmarks/experiments/decode_variant_registers.py

Programs an SM follow from the registers, the shared memory and the warps (sass_loop.programs_per_sm); a
count ranks nothing by itself, a GPU timing does (probe_decode_splits.py).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import sass_loop  # noqa: E402  (sets TRITON_INTERPRET=0 before triton loads)
import torch  # noqa: E402

import sageinfer.ops.paged_attention as pa  # noqa: E402

SEQS, HEADS, KV_HEADS, DIM, PAGE, KEYS = 4, 32, 8, 128, 64, 640
PLANS = [(1, 0), (8, 0), (8, 1024), (32, 0)]  # (splits, least keys a split)


class _NoMerge:
    """The merge's launch, dropped: only the attention kernel is compiled."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def rope_inputs():
    return (torch.zeros(SEQS, dtype=torch.int64), torch.zeros(SEQS, KV_HEADS, DIM, dtype=torch.bfloat16),
            torch.zeros(SEQS, KV_HEADS, DIM, dtype=torch.bfloat16), torch.zeros(64, DIM),
            torch.zeros(SEQS, dtype=torch.int64), torch.ones(DIM, dtype=torch.bfloat16),
            torch.ones(DIM, dtype=torch.bfloat16), 1e-6)


def main() -> None:
    pa._merge_splits_kernel = _NoMerge()
    blocks = SEQS * KEYS // PAGE
    cubins = set()
    print("| cache | rotary inside | splits, least keys | wide tiles | registers | spills | programs an SM | compile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode, dtype in [(0, torch.bfloat16), (1, torch.float8_e4m3fn), (2, torch.int8)]:
        k_cache = torch.zeros(blocks, PAGE, KV_HEADS, DIM, dtype=dtype)
        scales = torch.ones(blocks, PAGE, KV_HEADS) if mode == 2 else None
        q = torch.randn(SEQS, HEADS, DIM, dtype=torch.bfloat16)
        for rope in (False, True):
            for splits, least in PLANS:
                wide = [pa.WIDE_DECODE_CONFIGS[mode]] if mode in pa.WIDE_DECODE_CONFIGS and splits == 1 else []
                for config in [None] + wide:
                    def call():
                        pa.paged_attention(q, k_cache, k_cache.clone(), torch.empty_like(q),
                                           torch.arange(blocks, dtype=torch.int32).view(SEQS, -1),
                                           torch.full((SEQS,), KEYS, dtype=torch.int32),
                                           torch.arange(SEQS + 1, dtype=torch.int32), SEQS, 1, 0.08,
                                           num_splits=splits, max_seq_len=KEYS, min_split_keys=least,
                                           k_scale=scales, v_scale=scales, kv_mode=mode,
                                           rope=rope_inputs() if rope else None, config=config)
                    start = time.perf_counter()
                    compiled = sass_loop.compile_launch(pa, "_paged_attention_kernel", call)
                    seconds = time.perf_counter() - start
                    cubin = compiled["cubin"]
                    regs = sass_loop.registers(cubin)
                    fit = sass_loop.programs_per_sm(regs, compiled["shared"], compiled["options"]["num_warps"])
                    seen = "same cubin" if cubin in cubins else f"{seconds:.1f} s"
                    cubins.add(cubin)
                    print(f"| {['bf16', 'fp8', 'int8'][mode]} | {rope} | {splits}, {least} | {config is not None} | "
                          f"{regs} | {sass_loop.spills(cubin)} | {fit} | {seen} |", flush=True)
    print(f"distinct compiles: {len(cubins)}")


if __name__ == "__main__":
    main()
