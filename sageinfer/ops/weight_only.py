"""Weight-only quantized matmuls: y[M, N] = x[M, K] @ W[N, K]^T with W stored in fewer bits and
expanded in registers, so a matmul moves fewer bytes than a 16-bit weight would: what makes
single-stream decode faster. Each kernel has its torch reference (the path for large batches and for
devices without Triton).

- 4-bit: integers, eight to an int32 along K (nibble j of word w is column 8 w + j), a scale and a
  zero point per group of `group_size` columns and output row:
  W[n, k] = (q[n, k] - 8 - zero[n, k // g]) * scale[n, k // g].
- 8-bit FP8 (e4m3) with a scale per block x block tile, as block-quantized FP8 checkpoints hold them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 8] int32 -> [N, K] int32 nibbles in [0, 15]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1)


def pack(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values in [0, 15] -> [N, K / 8] int32 (the inverse of unpack)."""
    q = q.to(torch.int64).reshape(q.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (q << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    q = unpack(packed).float() - 8.0
    z = zeros.float().repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return ((q - z) * s).to(dtype)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn,
                 INT4: tl.constexpr, GROUP: tl.constexpr):
    """Rows ns x columns ks (one group: k0 // GROUP) of the weight, expanded to fp32 and scaled."""
    w_mask = n_mask[:, None] & k_mask[None, :]
    s = tl.load(s_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
    if INT4:
        words = tl.load(w_ptr + ns[:, None] * stride_wn + (ks // 8)[None, :], mask=w_mask, other=0)
        q = ((words >> ((ks % 8) * 4)[None, :]) & 0xF).to(tl.float32) - 8.0
        z = tl.load(z_ptr + ns * stride_sn + k0 // GROUP, mask=n_mask, other=0).to(tl.float32)
        q = q - z[:, None]
    else:
        raw = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0)
        q = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return q * s[:, None]


@triton.jit
def _weight_only_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                        INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """INT4: packed words, a scale and zero point per GROUP columns; else FP8 bytes with the scale
    of each GROUP-wide tile of the row. BLOCK_K divides GROUP: one scale column per K tile."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = ms < M, ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn, INT4, GROUP).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    tl.store(y_ptr + ms[:, None] * stride_ym + ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                       INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    n_mask, k_mask = ns < N, ks < K
    w = _weight_tile(w_ptr, s_ptr, z_ptr, ns, ks, k0, n_mask, k_mask, stride_wn, stride_sn, INT4, GROUP)
    tl.store(out_ptr + ns.to(tl.int64)[:, None] * stride_on + ks[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & k_mask[None, :])


def _dequantize_launch(w, scales, zeros, int4: bool, group: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight expanded in one pass (reads its bytes once, writes dtype once): what larger
    batches multiply with the library GEMM, instead of the torch reference's several fp32 passes."""
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    block_n, block_k = 32, min(128, group & -group)  # a power of two that divides the group
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](w, scales, zeros, out, n, k, w.stride(0), scales.stride(0), out.stride(0),
                             INT4=int4, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def dequantize_kernel(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` in one Triton pass."""
    n, k = packed.shape[0], packed.shape[1] * 8
    if k % group_size or scales.shape != (n, k // group_size):
        raise ValueError(f"dequantize: packed {tuple(packed.shape)}, scales {tuple(scales.shape)} and group "
                         f"{group_size} do not fit")
    return _dequantize_launch(packed, scales.contiguous(), zeros.contiguous(), True, group_size, n, k, dtype)


def dequantize_fp8_blocks_kernel(weight: torch.Tensor, scale: torch.Tensor, block: int,
                                 dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_fp8_blocks` in one Triton pass."""
    n, k = weight.shape
    if scale.shape != (n, (k + block - 1) // block):
        raise ValueError(f"dequantize_fp8_blocks: weight {tuple(weight.shape)}, scale {tuple(scale.shape)} and "
                         f"block {block} do not fit")
    scale = scale.float().contiguous()
    return _dequantize_launch(weight.view(torch.uint8), scale, scale, False, block, n, k, dtype)


def _launch(x, w, scales, zeros, int4: bool, group: int, n: int, block_m: int, block_n: int, block_k: int):
    m, k = x.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _weight_only_kernel[grid](x, w, scales, zeros, y, m, n, k, x.stride(0), w.stride(0), scales.stride(0),
                              y.stride(0), INT4=int4, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # fp32 models: exact sums
    return y


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [M, K] (16- or 32-bit floats), packed [N, K / 8] int32, scales [N, K / group] (x's dtype or
    fp32), zeros [N, K / group] int (0 for symmetric) -> [M, N] in x's dtype."""
    m, k = x.shape
    n = packed.shape[0]
    block_k = min(block_k, group_size)
    if packed.shape[1] * 8 != k or group_size % block_k or k % group_size or scales.shape != (n, k // group_size):
        raise ValueError(f"w4a16: x {tuple(x.shape)}, packed {tuple(packed.shape)}, scales {tuple(scales.shape)} "
                         f"and group {group_size} do not fit")
    return _launch(x.contiguous(), packed, scales.contiguous(), zeros.contiguous(), True, group_size, n, block_m,
                   block_n, block_k)


def dequantize_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """FP8 weight [N, K] with the scale of each row's block x block tiles, [N, ceil(K / b)] -> [N, K]."""
    k = weight.shape[1]
    return (weight.float() * scale.float().repeat_interleave(block, 1)[:, :k]).to(dtype)


def w8a16_block_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: int,
                       block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [M, K] @ (FP8 weight [N, K] x its block scales, given per row: [N, ceil(K / block)])^T -> [M, N]
    in x's dtype: the weights stream at one byte each and are scaled in registers."""
    m, k = x.shape
    n = weight.shape[0]
    block_k = min(block_k, block)
    if weight.shape[1] != k or block % block_k or scale.shape != (n, (k + block - 1) // block):
        raise ValueError(f"w8a16: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scale {tuple(scale.shape)} "
                         f"and block {block} do not fit")
    scale = scale.float().contiguous()
    return _launch(x.contiguous(), weight.view(torch.uint8), scale, scale, False, block, n, block_m, block_n, block_k)
