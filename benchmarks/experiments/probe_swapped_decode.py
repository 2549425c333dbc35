"""Decode attention with the operands swapped: keys as the MMA's rows, a KV head's GROUP query heads as
its columns (S^T = K q^T, O^T = V^T P^T), against ops/paged_attention.py's decode kernel.

Why: compiled for sm_90, the decode kernel (one query token x GROUP heads as 16 MMA rows, 2 warps, 64-key
tiles) holds each tile's K and V fragments in registers: 226 registers a thread over bf16 pages, 255 and
spills over FP8 or INT8 ones, so 4 programs (8 warps) fit on an SM and a batch of 256 x 8 KV heads runs in
about four waves, bound by each tile's latency (2.4-2.8 TB/s over 8-bit caches against 4.2 over bf16).
With keys as the rows, 64 of them fill one warpgroup's MMA (M = 64, 4 warps: Hopper's wgmma reads K from
shared memory) and the GROUP heads pad to 16 columns; scores and the output accumulate in few registers.

  python benchmarks/experiments/probe_swapped_decode.py --check          (CPU: the interpreter against the reference)
  python benchmarks/experiments/probe_swapped_decode.py --sass [--kv fp8] (no GPU: registers, shared memory, loop)
  python benchmarks/experiments/probe_swapped_decode.py [--modes auto,fp8] (GPU: us a layer beside the decode kernel)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))

from sageinfer.ops.fp16_operand import fp16_operand, fp16_operand_factor  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _swapped_tile(qt, m_i, l_i, acc_t, k_cache, v_cache, k_scale_ptr, v_scale_ptr, page, kv_head, keys, seq_len,
                  scale_log2, dims, stride_c_block, stride_c_slot, stride_c_head, NUM_KV_HEADS: tl.constexpr,
                  MASKED: tl.constexpr, INT8: tl.constexpr):
    offs = page.to(tl.int64) * stride_c_block + (keys % 64)[:, None] * stride_c_slot + kv_head * stride_c_head \
        + dims[None, :]
    if MASKED:
        k = tl.load(k_cache + offs, mask=(keys < seq_len)[:, None], other=0.0)
    else:
        k = tl.load(k_cache + offs)
    s_t = tl.dot(k.to(qt.dtype), qt)  # [keys, heads]
    if INT8:  # scales stored head-major (attention/backend.new_kv_scales): a page's keys of one head together
        scale_offs = (page.to(tl.int64) * NUM_KV_HEADS + kv_head) * 64 + keys % 64
        s_t = s_t * tl.load(k_scale_ptr + scale_offs)[:, None]
    if MASKED:
        s_t = tl.where((keys < seq_len)[:, None], s_t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s_t, 0) * scale_log2)
    p_t = tl.math.exp2(s_t * scale_log2 - m_new[None, :])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p_t, 0)
    if MASKED:
        v = tl.load(v_cache + offs, mask=(keys < seq_len)[:, None], other=0.0)
    else:
        v = tl.load(v_cache + offs)
    pv_t = p_t
    if INT8:
        pv_t = p_t * tl.where(keys < seq_len, tl.load(v_scale_ptr + scale_offs), 0.0)[:, None]
    acc_t = tl.dot(tl.trans(v.to(qt.dtype)), pv_t.to(qt.dtype), acc_t * alpha[None, :])  # [dims, heads]
    return m_new, l_i, acc_t


@triton.jit
def _swapped_decode_kernel(q_ptr, k_cache, v_cache, k_scale_ptr, v_scale_ptr, out_ptr, block_table_ptr, seq_lens_ptr,
                           scale_log2,
                           out_scale, q_scale, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
                           stride_c_block, stride_c_slot, stride_c_head, stride_bt,
                           GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                           NUM_KV_HEADS: tl.constexpr, FP16_QUERY: tl.constexpr, INT8: tl.constexpr):
    """One program: one sequence's one query token, one KV head's GROUP query heads; pages of BLOCK_N keys."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    head = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_q_tok + head[:, None] * stride_q_head + dims[None, :],
                mask=(g < GROUP)[:, None], other=0.0)
    if FP16_QUERY:
        q = fp16_operand(q, q_scale)
    qt = tl.trans(q)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_t = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
    full = seq_len // BLOCK_N
    for tile in range(0, full):
        page = tl.load(block_table_ptr + seq * stride_bt + tile)
        keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc_t = _swapped_tile(qt, m_i, l_i, acc_t, k_cache, v_cache, k_scale_ptr, v_scale_ptr, page, kv_head,
                                        keys, seq_len, scale_log2, dims, stride_c_block, stride_c_slot, stride_c_head,
                                        NUM_KV_HEADS, False, INT8)
    if full * BLOCK_N < seq_len:
        page = tl.load(block_table_ptr + seq * stride_bt + full)
        keys = full * BLOCK_N + tl.arange(0, BLOCK_N)
        m_i, l_i, acc_t = _swapped_tile(qt, m_i, l_i, acc_t, k_cache, v_cache, k_scale_ptr, v_scale_ptr, page, kv_head,
                                        keys, seq_len, scale_log2, dims, stride_c_block, stride_c_slot, stride_c_head,
                                        NUM_KV_HEADS, True, INT8)
    out_t = acc_t / l_i[None, :] * out_scale
    tl.store(out_ptr + seq * stride_o_tok + head[None, :] * stride_o_head + dims[:, None],
             out_t.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[None, :])


def swapped_decode(q, k_cache, v_cache, out, block_table, seq_lens, scale, fp8_scale=1.0, num_warps=4, num_stages=2,
                   k_scale=None, v_scale=None):
    """q, out: [seqs, Hq, D] (one token each); caches [blocks, 64, Hkv, D] (bf16, fp16, fp32, FP8 e4m3, or INT8
    with its head-major scales k_scale / v_scale from attention/backend.new_kv_scales)."""
    seqs, num_heads, head_dim = q.shape
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if page != 64:
        raise ValueError("the prototype takes pages of 64 keys")
    group = num_heads // num_kv_heads
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    int8 = k_cache.dtype == torch.int8
    if int8 and (k_scale is None or k_scale.stride(2) != 64):
        raise ValueError("an INT8 cache takes its scales head-major, as attention/backend.new_kv_scales makes them")
    factor = fp16_operand_factor(q) if fp8 else 1.0
    _swapped_decode_kernel[(seqs, num_kv_heads)](
        q, k_cache, v_cache, k_scale if int8 else q, v_scale if int8 else q, out, block_table, seq_lens,
        scale * LOG2E * (fp8_scale * factor if fp8 else 1.0),
        fp8_scale if fp8 else 1.0, 1.0 / factor, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=page,
        NUM_KV_HEADS=num_kv_heads, FP16_QUERY=fp8, INT8=int8, num_warps=num_warps, num_stages=num_stages)
    return out


def check() -> None:
    """The interpreter against the torch reference over random pages (fp32, FP8 and INT8 caches)."""
    from sageinfer.attention.backend import LayerKVCache, new_kv_scales
    from sageinfer.attention.torch_ref import paged_attention_ref
    from kernels_util import random_paged_batch, rel_err
    for dtype, kv in ((torch.float32, "fp32"), (torch.float16, "fp8"), (torch.float32, "int8")):
        lens = [1, 63, 64, 150]
        k, v, meta = random_paged_batch([1] * len(lens), [n - 1 for n in lens], 2, 32, 64, torch.float32,
                                        device="cpu", seed=3)
        fp8_scale, scales = 0.05, (None, None)
        if kv == "fp8":
            k, v = ((c / fp8_scale).to(torch.float8_e4m3fn) for c in (k, v))
            cache = LayerKVCache(k.double() * fp8_scale, v.double() * fp8_scale)
        elif kv == "int8":
            scales = tuple(new_kv_scales(k.shape[0], 64, 2, "cpu").uniform_(0.01, 0.05) for _ in range(2))
            k, v = (torch.randint(-127, 128, k.shape, dtype=torch.int8) for _ in range(2))
            cache = LayerKVCache(*(c.double() * sc.double().unsqueeze(-1) for c, sc in zip((k, v), scales)))
        else:
            cache = LayerKVCache(k.double(), v.double())
        q = torch.randn(len(lens), 8, 32).to(dtype)
        ref = paged_attention_ref(q.double(), cache, meta, 32 ** -0.5)
        out = swapped_decode(q, k, v, torch.empty_like(q), meta.block_table, meta.seq_lens, 32 ** -0.5,
                             fp8_scale if kv == "fp8" else 1.0, k_scale=scales[0], v_scale=scales[1])
        print(f"{kv} cache: relative error {rel_err(out, ref):.1e}")


def sass(kv: str, num_warps: int, num_stages: int) -> None:
    from sass_loop import compile_launch, loop_opcodes, programs_per_sm, registers, spills
    from sageinfer.attention.backend import new_kv_scales
    dtype = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[kv]
    seqs, blocks = 256, 256 * 10
    k_cache = torch.zeros(blocks, 64, 8, 128, dtype=dtype)
    scales = new_kv_scales(blocks, 64, 8, "cpu") if kv == "int8" else None
    q = torch.randn(seqs, 32, 128, dtype=torch.bfloat16)
    module = sys.modules[__name__]
    compiled = compile_launch(module, "_swapped_decode_kernel", lambda: swapped_decode(
        q, k_cache, k_cache.clone(), torch.empty_like(q), torch.arange(blocks, dtype=torch.int32).view(seqs, -1),
        torch.full((seqs,), 640, dtype=torch.int32), 0.08, num_warps=num_warps, num_stages=num_stages,
        k_scale=scales, v_scale=scales))
    regs = registers(compiled["cubin"])
    opcodes = loop_opcodes(compiled["cubin"])
    per_sm = programs_per_sm(regs, compiled["shared"], num_warps)
    print(f"{kv} cache, {num_warps} warps, {num_stages} stages: {regs} registers, {compiled['shared']} B shared, "
          f"{per_sm} programs an SM "
          f"(2,048 programs: {2048 / (132 * per_sm):.2f} waves on 132 SMs); spills {spills(compiled['cubin'])}")
    print(f"loop: {sum(opcodes.values())} instructions a thread a tile;", dict(opcodes.most_common(16)))


def time_on_gpu(modes: list[str], warps: list[int], stages: list[int]) -> None:
    """Qwen3-8B's decode shapes (32 query heads, 8 KV heads, head dim 128, pages of 64) over LAYERS distinct
    caches in a CUDA graph, as probe_quantized_decode.py times the decode kernel."""
    from probe_quantized_decode import LAYERS as layers, MODE, STORE as store, make_layer
    from sageinfer.ops import paged_attention as pa
    from tune_decode_step import graph_time
    dev = "cuda"
    print("| case | cache | kernel | us/layer | TB/s | max diff / max |")
    for (batch, keys), mode in itertools.product(((256, 640), (64, 4096), (32, 1024)), modes):
        pages = -(-keys // 64)
        blocks = batch * pages
        table = torch.randperm(blocks, device=dev).to(torch.int32).view(batch, pages)
        seq_lens = torch.full((batch,), keys, dtype=torch.int32, device=dev)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        q = torch.randn(batch, 32, 128, device=dev, dtype=torch.bfloat16)
        caches = [make_layer(mode, blocks, dev) for _ in range(layers)]
        nbytes = batch * keys * 8 * 2 * (128 * store[mode].itemsize + (4 if mode == "int8" else 0))
        kv_mode = MODE[mode]
        base = torch.empty_like(q)
        splits = pa.choose_num_splits(batch, 8, keys, torch.cuda.get_device_properties(0).multi_processor_count)
        k, v, ks, vs = caches[0]
        pa.paged_attention(q, k, v, base, table, seq_lens, qsl, batch, 1, 0.088, splits, kv_mode=kv_mode,
                           k_scale=ks, v_scale=vs)
        t = graph_time(lambda: [pa.paged_attention(q, k, v, base, table, seq_lens, qsl, batch, 1, 0.088,  # noqa
                                                   splits, kv_mode=kv_mode, k_scale=ks, v_scale=vs)
                                for k, v, ks, vs in caches])
        us = t / layers * 1e6
        print(f"| {batch}x{keys} | {mode} | decode kernel ({splits} splits) | {us:.1f} | "
              f"{nbytes / us / 1e6:.2f} | |", flush=True)
        for w, st in itertools.product(warps, stages):
            out = torch.empty_like(q)
            swapped_decode(q, k, v, out, table, seq_lens, 0.088, num_warps=w, num_stages=st, k_scale=ks, v_scale=vs)
            diff = ((out.float() - base.float()).abs().max() / base.float().abs().max()).item()
            t = graph_time(lambda: [swapped_decode(q, k, v, out, table, seq_lens, 0.088, num_warps=w,  # noqa
                                                   num_stages=st, k_scale=ks, v_scale=vs)  # noqa
                                    for k, v, ks, vs in caches])
            us = t / layers * 1e6
            print(f"| {batch}x{keys} | {mode} | swapped, {w} warps, {st} stages | {us:.1f} | "
                  f"{nbytes / us / 1e6:.2f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--sass", action="store_true")
    parser.add_argument("--kv", default="fp8", choices=["bf16", "fp8", "int8"])
    parser.add_argument("--modes", default="auto,fp8,int8")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="1,2")
    args = parser.parse_args()
    warps = [int(w) for w in args.warps.split(",")]
    stages = [int(st) for st in args.stages.split(",")]
    if args.check:
        check()
    elif args.sass:
        for w, st in itertools.product(warps, stages):
            sass(args.kv, w, st)
    else:
        time_on_gpu(args.modes.split(","), warps, stages)


if __name__ == "__main__":
    main()
