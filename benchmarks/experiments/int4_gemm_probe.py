"""The next GEMM on 4-bit words to time against the expansion (benchmarks/results/2026-12-03e-h200-w4a16-gemm.md
says why the last two lost): a trip takes a run of WORDS words a row and all eight of their nibbles as
8 * WORDS columns (nibble j = column // WORDS), one dot a trip (one wgmma wait), the weights the dot's
register operand (y^T = W x^T), the x columns gathered in that order and copied ahead by the pipeliner.
Symmetric layers only (no zero points). Two ways to the weights' scales, both compiled for sm_90 under
Triton 3.6 without spills:
  "p2d"  each column's scale loaded (repeats served by L1): 1,041 instructions a thread a 128x128 trip;
  "p2ds" a trip's 8 scales a row loaded once and spread over their columns in registers: 738.
Correctness on the GPU against the expansion, then the decode step's matmuls as time_int4_step times them:

  python benchmarks/experiments/int4_gemm_probe.py --rows 128,256 --paths "p2ds 128x128k16w8s3,p2d 128x128k16w8s3,expand"

("p2ds NxMkWORDSwWARPSsSTAGES"; other paths as time_int4_step takes them.)
"""
from __future__ import annotations

import os
import re
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))


@triton.jit
def _gemm_on_words(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                   GROUP: tl.constexpr, SLICE: tl.constexpr, WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, SPREAD_SCALES: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask, m_mask = ns < N, ms < M
    kk = tl.arange(0, 8 * WORDS)
    nibble = kk // WORDS
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for word0 in range(0, K // 8, WORDS):
        first = (word0 // SLICE) * 8 * SLICE + word0 % SLICE  # the run's column of these words' first nibble
        cols = nibble * SLICE + kk % WORDS + first
        xt = tl.load(x_ptr + ms[None, :] * stride_xm + cols[:, None], mask=m_mask[None, :], other=0.0)
        words = tl.load(w_ptr + ns[:, None] * stride_wn + (kk % WORDS + word0)[None, :], mask=n_mask[:, None],
                        other=0)
        if SPREAD_SCALES:
            j8 = tl.arange(0, 8)
            s8 = tl.load(s_ptr + ns[:, None] * stride_sn + ((j8 * SLICE + first) // GROUP)[None, :],
                         mask=n_mask[:, None], other=0.0).to(tl.float32)
            s = tl.reshape(tl.broadcast_to(s8[:, :, None], (BLOCK_N, 8, WORDS)), (BLOCK_N, 8 * WORDS))
        else:
            s = tl.load(s_ptr + ns[:, None] * stride_sn + ((nibble * SLICE + first) // GROUP)[None, :],
                        mask=n_mask[:, None], other=0.0).to(tl.float32)
        # the nibble under 2^23's exponent, less 2^23 + 8 in one exact subtraction
        bits = ((words >> (nibble * 4)[None, :]) & 0xF) | 0x4B000000
        w = (bits.to(tl.float32, bitcast=True) - 8388616.0) * s
        acc += tl.dot(w.to(xt.dtype), xt, input_precision=PRECISION)
    tl.store(y_ptr + ms[None, :] * stride_ym + ns[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


def gemm_on_words(x, packed, scales, group, slice_width, block_n=128, block_m=128, words=16, num_warps=8,
                  num_stages=3, spread_scales=True):
    """x [M, K] @ the symmetric 4-bit weight (words interleaved in slices [N, K / 8], scales [N, K / group])^T."""
    m, k = x.shape
    n = packed.shape[0]
    if slice_width % words or group % slice_width:
        raise ValueError(f"runs of {words} words must lie in slices of {slice_width}, each in one group of {group}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _gemm_on_words[grid](x.contiguous(), packed, scales, y, m, n, k, x.stride(0), packed.stride(0), scales.stride(0),
                         y.stride(0), GROUP=group, SLICE=slice_width, WORDS=words, BLOCK_N=block_n, BLOCK_M=block_m,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPREAD_SCALES=spread_scales,
                         num_warps=num_warps, num_stages=num_stages)
    return y


def main():
    import time_int4_step as step
    from sageinfer.ops.weight_only import dequantize_kernel, pack
    n, k = 6144, 4096
    scales = (torch.rand(n, k // 128, device="cuda") * 0.002 + 0.0005).to(torch.bfloat16)
    packed = pack(torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32), 128)
    x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_kernel(packed, scales, torch.zeros_like(scales, dtype=torch.int32), 128,
                                        torch.float32, 128).t()
    for spread in (False, True):
        y = gemm_on_words(x, packed, scales, 128, 128, spread_scales=spread)
        print(f"scales spread {spread}: relative error", ((y.float() - ref).norm() / ref.norm()).item(), flush=True)
    engine_paths = step.layer_calls

    def calls(path, rows, layer, dev, num_sms=None):
        spec = re.fullmatch(r"(p2ds?) (\d+)x(\d+)k(\d+)w(\d+)s(\d+)", path)
        if spec is None:
            return engine_paths(path, rows, layer, dev, num_sms)
        bn, bm, words, warps, stages = map(int, spec.groups()[1:])
        out = []
        for packed_, scales_, _zeros, dense in layer.values():
            xx = torch.randn(rows, dense.shape[1], device=dev, dtype=torch.bfloat16)
            out.append(lambda xx=xx, p=packed_, s=scales_: gemm_on_words(
                xx, p, s, step.GROUP, step.SLICE, bn, bm, words, warps, stages, spread_scales=spec.group(1) == "p2ds"))
        return out
    step.layer_calls = calls
    step.main()


if __name__ == "__main__":
    main()
