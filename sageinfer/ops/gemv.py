"""Skinny matmul for decode of a few sequences: y[M, N] = x[M, K] @ w[N, K]^T with M <= 8.

At batch 1..8 a linear layer is a pass over its weights; this kernel is built to stream them at the
memory's rate: each program owns BLOCK_N output features, walks K in BLOCK_K chunks (several loads
in flight), and reduces x * w on the CUDA cores in fp32; no split-K pass, no second kernel.
With gated=True the input is an MLP's [gate, up] projection and x = silu(gate) * up is formed on
the fly (rounded as ops.activation rounds it), so the down projection needs no SiLU-and-mul launch.
With activate=True the gate_up projection hands out that input itself: each program takes gate rows
and their up rows side by side and stores silu(gate) * up, formed once per output instead of once
per program of the down projection.

Weights may be 8-bit (FP8 e4m3 or INT8) with a scale per output feature: the kernel reads them as
they are stored, half the bytes of 16-bit ones, and scales the outputs, so quantized layers decode at
the memory's rate with 16-bit activations (weight-only arithmetic, no activation quantization). A
scale per output feature and group of input features (block FP8's tiles spread over their rows,
W8A16's groups) takes ops/gemv_grouped.py's kernel under the same contract; 4-bit integers packed
eight to an int32 (ops/weight_only.py's interleaved layout) take ops/gemv_int4.py's. 16-bit weights and
8-bit ones with a scale per row go to ops/gemv_words.py's kernel (the same contract, weights read as
words of four) wherever it reads the tensors: 16-bit inputs, rows aligned to 8 bytes; this kernel keeps
the rest (fp32 models, unaligned rows) and {"elements": True} in config.

The residual stream's add and RMSNorm fold in the same way, so a decoder layer at one row needs no
norm launch: with norm_weight the input is the (already summed) residual stream and every program
normalises it itself (one extra pass over K floats it reads anyway), rounded as ops.rms_norm rounds;
with residual the result is added to that stream in place (each program owns its output features).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.int8_values import values_as

MAX_ROWS = 8
# From benchmarks/experiments/tune_decode_step.py on an H100 (bf16, Qwen3-8B shapes at M = 1, 36 launches in one
# graph): qkv 19.1 us (2.63 TB/s), o 13.8, gate_up 67.1 (3.0 TB/s), lm_head 396 (3.2 TB/s),
# each 7-11% faster than torch; the gated down projection 38.0 us against SiLU-and-mul + torch 40.1.
# From M = 2 on the library GEMM is faster (benchmarks/experiments/tune_gemv.py), so the model uses this at M = 1.
GEMV_CONFIG = {"block_n": 4, "block_k": 2048, "num_warps": 4, "num_stages": 4}
GATED_GEMV_CONFIG = {"block_n": 8, "block_k": 2048, "num_warps": 8, "num_stages": 3}


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up from fp32 gate values, rounded as ops.activation rounds it (in up's dtype)."""
    return (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up


@triton.jit
def rms_scaled(x, rstd, norm_w, dtype):
    """RMSNorm of raw fp32 values with their rstd: normalise, round to dtype, scale (as ops.rms_norm)."""
    return (x * rstd).to(dtype) * norm_w


@triton.jit
def raw_input(x_ptr, norm_w_ptr, ms3, ks3, m_mask3, stride_xm, PRENORM: tl.constexpr):
    """Input columns ks3 of rows ms3 as stored, and with PRENORM the norm's weights for them (else the
    inputs again): what formed_input takes, loadable ahead of its use."""
    x = tl.load(x_ptr + ms3 * stride_xm + ks3, mask=m_mask3, other=0.0)
    return x, (tl.load(norm_w_ptr + ks3) if PRENORM else x)


@triton.jit
def formed_input(x, norm_w, rstd3, PRENORM: tl.constexpr):
    """raw_input's values as fp32, the RMS-normalised row scaled by norm_w with PRENORM."""
    if PRENORM:
        return rms_scaled(x.to(tl.float32), rstd3, norm_w, x.dtype).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def fused_input(x_ptr, ms3, ks3, m_mask3, stride_xm, K, rstd3, norm_w_ptr, GATED: tl.constexpr, PRENORM: tl.constexpr):
    """Input columns ks3 of rows ms3 (any shapes that broadcast) as fp32, formed as the one-row kernels
    fuse them: silu(gate) * up for a gated input, the RMS-normalised row scaled by norm_w with PRENORM."""
    if GATED:
        offs = ms3 * stride_xm + ks3
        gate = tl.load(x_ptr + offs, mask=m_mask3, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + offs, mask=m_mask3, other=0.0)
        return silu_times(gate, up).to(tl.float32)
    x, norm_w = raw_input(x_ptr, norm_w_ptr, ms3, ks3, m_mask3, stride_xm, PRENORM)
    return formed_input(x, norm_w, rstd3, PRENORM)


@triton.jit
def program_rows(pid, N, BLOCK_N: tl.constexpr, ACTIVATE: tl.constexpr):
    """A program's BLOCK_N weight rows and which of them exist. ACTIVATE (outputs silu(gate) * up over
    the [gate, up] halves of N): gate row i and up row N / 2 + i side by side, BLOCK_N / 2 outputs."""
    i = tl.arange(0, BLOCK_N)
    if ACTIVATE:
        out = pid * (BLOCK_N // 2) + i // 2
        return out + (i % 2) * (N // 2), out < N // 2
    rows = pid * BLOCK_N + i
    return rows, rows < N


@triton.jit
def quarters(t):
    """[..., 4 Q] -> its four [..., Q] parts: part i holds elements 4 j + i (each thread's four
    consecutive elements, loaded as one vector, split in registers)."""
    even, odd = tl.split(tl.reshape(t, t.shape[:-1] + (t.shape[-1] // 4, 2, 2)))
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    return q0, q1, q2, q3


@triton.jit
def program_tile_3d(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACTIVATE: tl.constexpr):
    """program_rows, and the indices of a 3-D tile [rows of x, output features, columns]: the weight
    rows and their mask as [1, BLOCK_N, 1] (int64 offsets), x's rows as [BLOCK_M, 1, 1] and theirs."""
    rows, row_mask = program_rows(pid, N, BLOCK_N, ACTIVATE)
    ms = tl.arange(0, BLOCK_M)
    ms3 = ms[:, None, None]
    return rows, row_mask, rows[None, :, None].to(tl.int64), row_mask[None, :, None], ms, ms3, ms3 < M


@triton.jit
def store_activated(y_ptr, y, ms, m_mask, stride_ym, pid, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """silu(gate) * up of program_rows' paired outputs y [BLOCK_M, BLOCK_N] (in the model's dtype, as the
    projection would have stored them), into y_ptr [M, N / 2]."""
    gate, up = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
    outs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + ms[:, None] * stride_ym + outs[None, :], silu_times(gate.to(tl.float32), up),
             mask=m_mask[:, None] & (outs < N // 2)[None, :])


@triton.jit
def finish_rows(y_acc, x_ptr, bias_ptr, y_ptr, ms, m_mask, rows, row_mask, stride_ym, pid, N,
                HAS_BIAS: tl.constexpr, ACTIVATE: tl.constexpr, ADD_TO_Y: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """A program's fp32 sums [BLOCK_M, BLOCK_N] for its rows' outputs, finished as every one-row kernel
    finishes them: the bias added, rounded as the model's dtype rounds, then silu(gate) * up stored
    (ACTIVATE), or stored into y, or added to it (ADD_TO_Y: the residual, as two tensors of the
    model's dtype add)."""
    if HAS_BIAS:
        y_acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y = y_acc.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty)
    if ACTIVATE:
        store_activated(y_ptr, y, ms, m_mask, stride_ym, pid, N, BLOCK_M, BLOCK_N)
    else:
        y_ptrs = y_ptr + ms[:, None] * stride_ym + rows[None, :]
        y_mask = m_mask[:, None] & row_mask[None, :]
        if ADD_TO_Y:
            y = y + tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, y, mask=y_mask)


@triton.jit
def _normed(x, rstd, norm_w_ptr, ks, K, dtype):
    """RMSNorm of raw fp32 input values (rms_scaled), in fp32."""
    norm_w = tl.load(norm_w_ptr + ks, mask=ks < K, other=0.0)
    return rms_scaled(x, rstd[:, None], norm_w[None, :], dtype).to(tl.float32)


@triton.jit
def weights_f32(w):
    """Weights as fp32, INT8 without I2F (ops/int8_values.py): INT8 was the one 8-bit format whose
    one-row decode was slower than bf16 (L1 TPOT 5.23 ms on an H200 against 4.81, FP8 3.82 with as
    many instructions as this form, all at the full rate)."""
    return values_as(w, tl.float32)


@triton.jit
def _dot_rows(x, w):
    return tl.sum(x[:, None, :] * weights_f32(w)[None, :, :], axis=2)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                 stride_ym, eps, HAS_SCALE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, GATED: tl.constexpr, PRENORM: tl.constexpr, ADD_TO_Y: tl.constexpr,
                 USE_PDL: tl.constexpr, ACTIVATE: tl.constexpr):
    pid = tl.program_id(0)
    rows, row_mask = program_rows(pid, N, BLOCK_N, ACTIVATE)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    # Under dependent launch the first weight chunk (no kernel writes weights) is requested before
    # waiting for the kernel that produces x.
    w = tl.load(w_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    launch.wait_for_previous_kernel(USE_PDL)
    if PRENORM:
        # The first two chunks of x are fetched together and kept: the norm's sum of squares costs
        # no extra round trip when K <= 2 * BLOCK_K (a 4096-wide hidden state in 2048-wide chunks).
        ks1 = BLOCK_K + ks
        x0 = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)
        x1 = tl.load(x_ptr + ms[:, None] * stride_xm + ks1[None, :], mask=m_mask[:, None] & (ks1 < K)[None, :],
                     other=0.0).to(tl.float32)
        dtype = x0.dtype
        x0 = x0.to(tl.float32)
        sum_sq = tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1)
        for k0 in range(2 * BLOCK_K, K, BLOCK_K):
            kr = k0 + ks
            xr = tl.load(x_ptr + ms[:, None] * stride_xm + kr[None, :], mask=m_mask[:, None] & (kr < K)[None, :],
                         other=0.0).to(tl.float32)
            sum_sq += tl.sum(xr * xr, 1)
        rstd = 1.0 / tl.sqrt(sum_sq / K + eps)
        acc = _dot_rows(_normed(x0, rstd, norm_w_ptr, ks, K, dtype), w)
        w = tl.load(w_rows + ks1[None, :], mask=row_mask[:, None] & (ks1 < K)[None, :], other=0.0)
        acc += _dot_rows(_normed(x1, rstd, norm_w_ptr, ks1, K, dtype), w)
        for k0 in range(2 * BLOCK_K, K, BLOCK_K):
            kr = k0 + ks
            w = tl.load(w_rows + kr[None, :], mask=row_mask[:, None] & (kr < K)[None, :], other=0.0)
            xr = tl.load(x_ptr + ms[:, None] * stride_xm + kr[None, :], mask=m_mask[:, None] & (kr < K)[None, :],
                         other=0.0).to(tl.float32)
            acc += _dot_rows(_normed(xr, rstd, norm_w_ptr, kr, K, dtype), w)
    else:
        acc = _dot_rows(fused_input(x_ptr, ms[:, None], ks[None, :], m_mask[:, None] & k_mask[None, :], stride_xm, K,
                                    0.0, x_ptr, GATED, False), w)
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
            acc += _dot_rows(fused_input(x_ptr, ms[:, None], ks[None, :], x_mask, stride_xm, K, 0.0, x_ptr, GATED, False),
                             w)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    finish_rows(acc, x_ptr, bias_ptr, y_ptr, ms, m_mask, rows, row_mask, stride_ym, pid, N, HAS_BIAS, ACTIVATE,
                ADD_TO_Y, BLOCK_M, BLOCK_N)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None, gated: bool = False, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
         weight_scale: torch.Tensor | None = None, weight_zero: torch.Tensor | None = None,
         int4: bool = False, slice_width: int = 1, activate: bool = False, fp4: str | None = None,
         row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] with M <= MAX_ROWS ([M, 2K] of [gate, up] when gated), weight: [N, K] (rows
    contiguous), bias: [N] or None -> [M, N].
    weight_scale: the scale of each 8-bit weight row ([N]: output = (x @ weight.T) * scale), or of
    each row's groups of K / G consecutive input features ([N, G]: block FP8, 4-bit groups).
    int4: weight is [N, K / 8] int32, eight 4-bit values to a word along the input, interleaved in
    slices of slice_width columns (ops/weight_only.py), each stored plus 8; weight_scale [N, G] is
    required and weight_zero [N, G] (integers, subtracted before scaling) optional.
    fp4 ("e4m3" or "e8m0", with int4): the words hold FP4 e2m1 values (ops/fp4_weights.py), weight_scale
    is their [N, G] scale bytes of that kind and row_scale [N] float32 multiplies each output.
    norm_weight: x is RMS-normalised (eps) and scaled by it first, as ops.rms_norm does.
    residual: [M, N]; the result is added to it in place and residual is returned.
    activate: the N outputs are an MLP's [gate, up]; returns silu(gate) * up [M, N / 2] instead.
    out_dtype: the output's dtype (values still rounded to the input's dtype first), e.g. float32
    logits without a separate cast."""
    m = x.shape[0]
    n, k = weight.shape
    if int4:
        k *= 8
        if weight.dtype != torch.int32 or weight_scale is None or weight_scale.dim() != 2:
            raise ValueError("gemv: 4-bit weights come packed in int32 words with a scale per row and group")
    if x.shape[1] != (2 * k if gated else k):
        raise ValueError(f"gemv: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (gated={gated}, "
                         f"int4={int4})")
    if m > MAX_ROWS or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv takes up to {MAX_ROWS} rows with contiguous feature dims, got {tuple(x.shape)}")
    if gated and norm_weight is not None:
        raise ValueError("gemv: a gated input is not normalised")
    if residual is not None and (residual.shape != (m, n) or residual.stride(1) != 1):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} does not fit output ({m}, {n})")
    group = 0
    if weight_scale is not None:
        if (weight_scale.dim() == 2 and weight_scale.shape[0] == n and k % weight_scale.shape[1] == 0
                and weight_scale.stride(1) == 1):
            group = k // weight_scale.shape[1]
        elif weight_scale.dim() != 1 or weight_scale.numel() != n:
            raise ValueError(f"gemv: weight_scale {tuple(weight_scale.shape)} is neither per row ({n},) nor per row "
                             f"and group of input features ({n}, G) with G dividing {k}, contiguous")
    if weight_zero is not None and (weight_zero.shape != weight_scale.shape
                                    or weight_zero.stride() != weight_scale.stride() or not group):
        raise ValueError(f"gemv: weight_zero {tuple(weight_zero.shape)} must match the grouped weight_scale's layout")
    if activate and (gated or residual is not None or out_dtype is not None or n % 2):
        raise ValueError("gemv: activate takes an even number of outputs, without a gated input, residual or "
                         "out_dtype")
    y = residual if residual is not None else torch.empty(m, n // 2 if activate else n, dtype=out_dtype or x.dtype,
                                                          device=x.device)
    if int4:
        from sageinfer.ops.gemv_int4 import int4_gemv
        return int4_gemv(x, weight, weight_scale, weight_zero, group, slice_width, y, bias, gated, norm_weight, eps,
                         residual is not None, config, activate, fp4, row_scale)
    if group:
        if group & (group - 1) or group < 16:
            raise ValueError(f"gemv: scale groups of {group} input features; powers of two from 16 only")
        from sageinfer.ops.gemv_grouped import grouped_gemv
        return grouped_gemv(x, weight, weight_scale, group, y, bias, gated, norm_weight, eps, residual is not None,
                            activate, config)
    from sageinfer.ops.gemv_words import GEMV_WORDS, gemv_words, words_fit
    # config {"elements": True}: this kernel even where the word kernel reads the tensors.
    if not (config or {}).get("elements", not GEMV_WORDS) and words_fit(x, weight, weight_scale, norm_weight):
        return gemv_words(x, weight, weight_scale, y, bias, gated, norm_weight, eps, residual is not None, activate,
                          config if config and "words" in config else None)
    cfg = {**(GATED_GEMV_CONFIG if gated else GEMV_CONFIG), **(config or {})}
    block_m = max(1, triton.next_power_of_2(m))
    # Keep x * w tiles inside the registers as rows grow.
    block_k = max(64, cfg["block_k"] // block_m)
    _gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, weight, weight_scale if weight_scale is not None else x,
        bias if bias is not None else x, norm_weight if norm_weight is not None else x, y,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), eps,
        HAS_SCALE=weight_scale is not None,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, GATED=gated, PRENORM=norm_weight is not None, ADD_TO_Y=residual is not None,
        ACTIVATE=activate,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
