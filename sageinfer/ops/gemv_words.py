"""One-row decode read as words of four weights: FP8 e4m3 and INT8 weights with a scale per output
feature (int32 words of four bytes), 16-bit weights (8-byte words of four values).

ops/gemv.py's kernel converts weights one element at a time, and Triton regroups values of different
weight rows into pairs before each conversion (on sm_90: 478 instructions a thread for 64 FP8 weights,
120 of them byte permutes), then sums x * w across threads every chunk. Here each word becomes its
four fp32 values in place (FP8: two pairs an instruction where PTX runs; INT8: two pairs through fp16's
1024 + n, platforms/cuda_device.py; elsewhere the same values in Triton), each against the input of
its own column, and the products stay per thread until the loop ends. Every tensor is made in the
accumulator's 3-D shape [rows of x, output features, words] from its pointers (as ops/gemv_int4.py
does), and 8-bit words are loaded two at a time, as wide as the inputs' four 16-bit values, so Triton
gives weights and inputs one layout: no value changes layout inside the loop. The contract, fusions
included, is ops.gemv.gemv's; it launches this kernel.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sageinfer.ops import launch
from sageinfer.ops.gemv import finish_rows, program_tile_3d, rms_scaled, silu_times
from sageinfer.ops.int8_values import int8_as_f32
from sageinfer.platforms.cuda_device import e4m3_word_values, int8_word_values, ptx_arch

# Per weight kind: output features a program owns, words of four weights it reads a trip per feature.
# 16 features measured 2-4% faster in the isolated step's matmuls but slower end to end (H200 L1 TPOT bf16
# 4.33 against 4.29 ms, FP8 W+KV 3.07 against 3.03: 2026-12-04c-h200-one-row-activate-words.md).
WORDS_CONFIGS = {
    "e4m3": {"block_n": 8, "words": 256, "num_warps": 4, "num_stages": 2},
    "int8": {"block_n": 8, "words": 256, "num_warps": 4, "num_stages": 2},
    "16": {"block_n": 8, "words": 256, "num_warps": 4, "num_stages": 2},
}
# SAGEINFER_GEMV_WORDS=0: one-row layers take ops/gemv.py's element-wise kernel instead (for comparison).
GEMV_WORDS = os.environ.get("SAGEINFER_GEMV_WORDS", "1") != "0"
KINDS = {torch.float8_e4m3fn: "e4m3", torch.int8: "int8", torch.bfloat16: "16", torch.float16: "16"}


@triton.jit
def _quad_values(quad, dtype: tl.constexpr):
    """The four 16-bit values (bf16 or fp16) of each int64 (value i in bits 16 i ..) as fp32."""
    lo, hi = quad.to(tl.int32), (quad >> 32).to(tl.int32)
    if dtype == tl.bfloat16:  # a bf16's bits are the upper half of its fp32's
        q0, q1 = (lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True)
        q2, q3 = (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True)
    else:
        q0 = lo.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        q1 = (lo >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        q2 = hi.to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
        q3 = (hi >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    return q0, q1, q2, q3


@triton.jit
def _word_values(words, KIND: tl.constexpr, W_DTYPE: tl.constexpr, PTX: tl.constexpr):
    """The four weights of each word as fp32: KIND 0 e4m3 bytes, 1 INT8 bytes (byte i -> value i), 2
    16-bit values of W_DTYPE (a Triton dtype) in an int64."""
    if KIND == 2:
        v0, v1, v2, v3 = _quad_values(words, W_DTYPE)
    elif PTX and KIND == 0:
        v0, v1, v2, v3 = e4m3_word_values(words)
    elif PTX:
        v0, v1, v2, v3 = int8_word_values(words)
    elif KIND == 0:
        v0 = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        v1 = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        v2 = ((words >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        v3 = ((words >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:  # each byte sign-extended by a shift pair, then made a float without I2F
        v0 = int8_as_f32((words << 24) >> 24)
        v1 = int8_as_f32((words << 16) >> 24)
        v2 = int8_as_f32((words << 8) >> 24)
        v3 = int8_as_f32(words >> 24)
    return v0, v1, v2, v3


@triton.jit
def _quads(ptr, offsets3, mask3):
    """The four 16-bit values (bf16 or fp16, ptr's type) at 4 j .. 4 j + 3 for each j in offsets3 (in
    words of four), as fp32: one 8-byte load each, loaded in the words' own layout."""
    quad = tl.load(ptr.to(tl.pointer_type(tl.int64)) + offsets3, mask=mask3, other=0)
    return _quad_values(quad, ptr.dtype.element_ty)


@triton.jit
def _formed(x, norm_w, up, rstd3, dtype, GATED: tl.constexpr, PRENORM: tl.constexpr):
    """One quad of the fused input (ops/gemv.fused_input) from fp32 values: silu(gate) * up for a gated
    input (x the gate), the RMS-normalised row scaled by norm_w with PRENORM."""
    if GATED:
        value = silu_times(x, up.to(dtype)).to(tl.float32)
    elif PRENORM:
        value = rms_scaled(x, rstd3, norm_w.to(dtype), dtype).to(tl.float32)
    else:
        value = x
    return value


@triton.jit
def _input_quads(x_ptr, norm_w_ptr, ms3, m_mask3, words3, k_words, stride_xm, rstd3, GATED: tl.constexpr,
                 PRENORM: tl.constexpr):
    """The fused input at the four columns of each word in words3 [1, 1, W], as four fp32 [M, 1, W]."""
    mask = m_mask3 & (words3 < k_words)
    row = ms3 * (stride_xm // 4)
    x0, x1, x2, x3 = _quads(x_ptr, row + words3, mask)
    n0, n1, n2, n3 = x0, x1, x2, x3
    u0, u1, u2, u3 = x0, x1, x2, x3
    if PRENORM:
        n0, n1, n2, n3 = _quads(norm_w_ptr, words3, words3 < k_words)
    if GATED:
        u0, u1, u2, u3 = _quads(x_ptr, row + k_words + words3, mask)
    dtype = x_ptr.dtype.element_ty
    return (_formed(x0, n0, u0, rstd3, dtype, GATED, PRENORM), _formed(x1, n1, u1, rstd3, dtype, GATED, PRENORM),
            _formed(x2, n2, u2, rstd3, dtype, GATED, PRENORM), _formed(x3, n3, u3, rstd3, dtype, GATED, PRENORM))


@triton.jit(do_not_specialize=["M"])
def _gemv_words_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, norm_w_ptr, y_ptr, M, N, K, stride_xm, stride_wn,
                       stride_ym, eps, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GATED: tl.constexpr, PRENORM: tl.constexpr,
                       ADD_TO_Y: tl.constexpr, USE_PDL: tl.constexpr, ACTIVATE: tl.constexpr, KIND: tl.constexpr,
                       PTX: tl.constexpr):
    """w_ptr: the weights as words [N, K / 4] (int32 for 8-bit KINDs 0 and 1, int64 for 16-bit KIND 2, whose
    values are of x's dtype), stride_wn in words."""
    pid = tl.program_id(0)
    rows, row_mask, rows3, row_mask3, ms, ms3, m_mask3 = program_tile_3d(pid, M, N, BLOCK_M, BLOCK_N, ACTIVATE)
    ws3 = tl.arange(0, WORDS)[None, None, :]
    if KIND == 2:
        at3 = ws3
    else:
        # 4-byte words two to a load (8 bytes), the width of the inputs' loads, so that both come in one
        # layout (Triton vectorises each load by its pointers' contiguity).
        at3 = ws3 // 2 * 2 + ws3 % 2
    w_rows = w_ptr + rows3 * stride_wn
    k_words = K // 4
    # Under dependent launch the first weights (no kernel writes them) are requested before waiting
    # for the kernel that produces x.
    words = tl.load(w_rows + at3, mask=row_mask3 & (ws3 < k_words), other=0)
    launch.wait_for_previous_kernel(USE_PDL)
    rstd3 = tl.zeros((BLOCK_M, 1, 1), tl.float32)
    if PRENORM:
        sum_sq = tl.zeros((BLOCK_M, 1, 4 * WORDS), tl.float32)
        ks3 = tl.arange(0, 4 * WORDS)[None, None, :]
        for k0 in range(0, K, 4 * WORDS):
            xr = tl.load(x_ptr + ms3 * stride_xm + k0 + ks3, mask=m_mask3 & (k0 + ks3 < K), other=0.0)
            xr = xr.to(tl.float32)
            sum_sq += xr * xr
        rstd3 = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=2, keep_dims=True) / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), tl.float32)
    for w0 in range(0, k_words, WORDS):
        v0, v1, v2, v3 = _word_values(words, KIND, x_ptr.dtype.element_ty, PTX)
        if w0 + WORDS < k_words:
            words = tl.load(w_rows + w0 + WORDS + at3, mask=row_mask3 & (w0 + WORDS + ws3 < k_words), other=0)
        x0, x1, x2, x3 = _input_quads(x_ptr, norm_w_ptr, ms3, m_mask3, w0 + ws3, k_words, stride_xm, rstd3, GATED,
                                      PRENORM)
        acc += x0 * v0
        acc += x1 * v1
        acc += x2 * v2
        acc += x3 * v3
    y_acc = tl.sum(acc, axis=2)
    if HAS_SCALE:
        y_acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    finish_rows(y_acc, x_ptr, bias_ptr, y_ptr, ms, ms < M, rows, row_mask, stride_ym, pid, N, HAS_BIAS, ACTIVATE,
                ADD_TO_Y, BLOCK_M, BLOCK_N)


def _kinds_fit(weight: torch.Tensor, weight_scale: torch.Tensor | None, x_dtype: torch.dtype) -> bool:
    """16-bit inputs; FP8 or INT8 weights with a scale per row, or 16-bit weights of the input's dtype;
    rows of whole words."""
    kind = KINDS.get(weight.dtype)
    if kind is None or x_dtype not in (torch.bfloat16, torch.float16) or weight.shape[1] % 4:
        return False
    if kind == "16":
        return weight_scale is None and weight.dtype == x_dtype
    return weight_scale is not None and weight_scale.dim() == 1


def reads_words(weight: torch.Tensor, weight_scale: torch.Tensor | None, x_dtype: torch.dtype) -> bool:
    """Whether one-row matmuls of these weights and inputs of x_dtype take this kernel by default (the
    model's choices that depend on the kernel ask this; each launch also checks words_fit)."""
    return GEMV_WORDS and _kinds_fit(weight, weight_scale, x_dtype)


def words_fit(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
              norm_weight: torch.Tensor | None) -> bool:
    """Whether this kernel reads these tensors: _kinds_fit, and inputs whose every four columns are one
    8-byte load (a norm's weights too)."""
    if not _kinds_fit(weight, weight_scale, x.dtype):
        return False
    tensors = [x] + ([norm_weight] if norm_weight is not None else [])
    return (weight.stride(0) % 4 == 0 and weight.data_ptr() % (4 * weight.element_size()) == 0
            and x.stride(0) % 4 == 0 and all(t.data_ptr() % 8 == 0 and t.stride(-1) == 1 for t in tensors))


def gemv_words(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, y: torch.Tensor,
               bias: torch.Tensor | None, gated: bool, norm_weight: torch.Tensor | None, eps: float, add_to_y: bool,
               activate: bool, config: dict | None) -> torch.Tensor:
    """Launched by ops.gemv.gemv, which has checked the shapes, where words_fit: weight [N, K] with K a
    multiple of 4, weight_scale [N] for 8-bit weights. Writes (or adds to) y [M, N], or silu(gate) * up
    into y [M, N / 2] with activate."""
    m, (n, k) = x.shape[0], weight.shape
    kind = KINDS[weight.dtype]
    cfg = config or WORDS_CONFIGS[kind]
    block_m = max(1, triton.next_power_of_2(m))
    ptx = cfg.get("ptx")
    ptx = ptx_arch() >= (89 if kind == "e4m3" else 80) if ptx is None else ptx  # cvt.rn.f16x2.e4m3x2 from sm_89
    words = weight.view(torch.int64 if kind == "16" else torch.int32)
    _gemv_words_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x, words, weight_scale if weight_scale is not None else x, bias if bias is not None else x,
        norm_weight if norm_weight is not None else x, y, m, n, k, x.stride(0), weight.stride(0) // 4, y.stride(0), eps,
        HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
        WORDS=max(16, cfg["words"] // block_m), GATED=gated, PRENORM=norm_weight is not None, ADD_TO_Y=add_to_y,
        ACTIVATE=activate, KIND=("e4m3", "int8", "16").index(kind), PTX=ptx,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch.dependent_launch_kwargs())
    return y
