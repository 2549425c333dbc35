"""Skinny matmul for decode of a few sequences: y[M, N] = x[M, K] @ w[N, K]^T with M <= 8.

At batch 1..8 a linear layer is a pass over its weights; this kernel is built to stream them at the
memory's rate: each program owns BLOCK_N output features, walks K in BLOCK_K chunks (several loads
in flight), and reduces x * w on the CUDA cores in fp32; no split-K pass, no second kernel.
With gated=True the input is an MLP's [gate, up] projection and x = silu(gate) * up is formed on
the fly (rounded as ops.activation rounds it), so the down projection needs no SiLU-and-mul launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch

MAX_ROWS = 8
# From benchmarks/tune_decode_step.py on an H100 (bf16, Qwen3-8B shapes at M = 1, 36 launches in one
# graph): qkv 19.1 us (2.63 TB/s), o 13.8, gate_up 67.1 (3.0 TB/s), lm_head 396 (3.2 TB/s),
# each 7-11% faster than torch; the gated down projection 38.0 us against SiLU-and-mul + torch 40.1.
# From M = 2 on the library GEMM is faster (benchmarks/tune_gemv.py), so the model uses this at M = 1.
GEMV_CONFIG = {"block_n": 4, "block_k": 2048, "num_warps": 4, "num_stages": 4}
GATED_GEMV_CONFIG = {"block_n": 8, "block_k": 2048, "num_warps": 8, "num_stages": 3}


@triton.jit
def _x_chunk(x_ptr, ms, ks, x_mask, stride_xm, K, GATED: tl.constexpr):
    x_offs = ms[:, None] * stride_xm + ks[None, :]
    if GATED:
        gate = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + x_offs, mask=x_mask, other=0.0)
        return ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(tl.float32)
    return tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    # Under dependent launch the first weight chunk (no kernel writes weights) is requested before
    # waiting for the kernel that produces x.
    w = tl.load(w_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    launch.wait_for_previous_kernel(USE_PDL)
    x = _x_chunk(x_ptr, ms, ks, m_mask[:, None] & k_mask[None, :], stride_xm, K, GATED)
    acc = tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w_mask = row_mask[:, None]
            x_mask = m_mask[:, None]
        else:
            k_mask = ks < K
            w_mask = row_mask[:, None] & k_mask[None, :]
            x_mask = m_mask[:, None] & k_mask[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        x = _x_chunk(x_ptr, ms, ks, x_mask, stride_xm, K, GATED)
        acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & row_mask[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None, gated: bool = False) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS ([M, 2K] of [gate, up] when gated), weight: [N, K] (rows
    contiguous), bias: [N] or None -> [M, N]."""
    m = x.shape[0]
    n, k = weight.shape
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"gemv: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (gated={gated})")
    if m > MAX_ROWS or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv takes up to {MAX_ROWS} rows with contiguous feature dims, got {tuple(x.shape)}")
    cfg = config or (GATED_GEMV_CONFIG if gated else GEMV_CONFIG)
    block_m = max(1, triton.next_power_of_2(m))
    # Keep x * w tiles inside the registers as rows grow.
    block_k = max(64, cfg["block_k"] // block_m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, bias if bias is not None else weight, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, GATED=gated, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
