"""FP4 e2m1 weights at four bits (ops/fp4_weights.py): the layout, its expansion and the matmuls that read it,
against the torch reference."""
from __future__ import annotations

import pytest
import torch

from kernels_util import DEVICE, rel_err
from sageinfer.ops.fp4_weights import (e2m1_values, fp4_dequantize, fp4_dequantize_kernel, fp4_pack, fp4_unpack,
                                       group_scale_values, scales_column_order, scales_run_major)


def _fp4_layer(n, k, group, e8m0, seed=0):
    """Random codes (every code at every position of a word), scale bytes as the checkpoints hold them and
    row scales."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    if e8m0:
        scale = torch.randint(112, 126, (n, k // group), generator=gen).to(torch.uint8)
        row_scale = torch.ones(n)
    else:  # FP8 e4m3 bytes, subnormal ones too
        scale = (torch.rand(n, k // group, generator=gen) * 400 + 2 ** -9).to(torch.float8_e4m3fn).view(torch.uint8)
        row_scale = torch.rand(n, generator=gen) / 500 + 1e-4
    return codes, scale, row_scale


@pytest.mark.parametrize("slice_width", [1, 4, 16, 32])
def test_fp4_layout_round_trips_and_decodes_each_value(slice_width):
    codes, _, _ = _fp4_layer(6, 512, 16, False)
    words = fp4_pack(codes, slice_width)
    assert words.shape == (6, 64) and words.dtype == torch.int32
    assert torch.equal(fp4_unpack(words, slice_width), codes)
    # The same values as compressed-tensors' own FP4 unpacking of the checkpoint's bytes
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    torch.testing.assert_close(e2m1_values(codes), unpack_fp4_from_uint8(packed, 6, 512, dtype=torch.float32))


@pytest.mark.parametrize("e8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("wide", [False, True])
def test_fp4_expansion_matches_the_reference(e8m0, dtype, wide):
    """Slices of one group, or of several (each run's scales then stored slice-minor)."""
    group = 32 if e8m0 else 16
    slice_width = 128 if wide else group
    codes, scale, row_scale = _fp4_layer(40, 1024, group, e8m0)
    words = fp4_pack(codes, slice_width)
    expected_scale = scale
    scale = scales_run_major(scale, group, slice_width)
    assert torch.equal(scales_column_order(scale, group, slice_width), expected_scale)
    ref = fp4_dequantize(words, scale, row_scale, group, e8m0, torch.float32, slice_width)
    expected = (e2m1_values(codes) * group_scale_values(expected_scale, e8m0).repeat_interleave(group, 1)
                * row_scale[:, None])
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    out = fp4_dequantize_kernel(words.to(DEVICE), scale.to(DEVICE), row_scale.to(DEVICE), group, e8m0, dtype,
                                slice_width)
    # (the interpreter rounds to bf16 by truncation: one unit of its last place)
    rtol = 2 ** -7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0
    torch.testing.assert_close(out.float().cpu(), ref.to(dtype).float(), rtol=rtol, atol=0)


def _fp4_case(n, k, group, e8m0, dtype, rows=1, seed=0):
    slice_width = 128 if k % 1024 == 0 else 16
    codes, scale, row_scale = _fp4_layer(n, k, group, e8m0, seed)
    words, scale = fp4_pack(codes, slice_width), scales_run_major(scale, group, slice_width)
    dense = fp4_dequantize(words, scale, row_scale, group, e8m0, torch.float32, slice_width)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    on = {"weight": words.to(DEVICE), "weight_scale": scale.to(DEVICE), "row_scale": row_scale.to(DEVICE),
          "int4": True, "fp4": "e8m0" if e8m0 else "e4m3", "slice_width": slice_width}
    return x, dense, on


@pytest.mark.parametrize("e8m0", [False, True])
@pytest.mark.parametrize("k", [512, 1024])
@pytest.mark.parametrize("fold", ["plain", "norm", "residual", "activate"])
def test_fp4_one_row_matches_the_dequantized_weights(e8m0, k, fold):
    """One row through the fp16-pair loop (in plain Triton here; NVIDIA's PTX on a GPU): groups of 16 (NVFP4)
    or 32 (MXFP4) inside slices of 16 or 128 columns, with the one-row kernel's folds."""
    from sageinfer.ops.gemv import gemv
    group = 32 if e8m0 else 16
    x, dense, on = _fp4_case(96, k, group, e8m0, torch.float16)
    xf = x.float()
    kwargs = {}
    if fold == "norm":
        norm_w = torch.rand(k) + 0.5
        kwargs = {"norm_weight": norm_w.half().to(DEVICE), "eps": 1e-6}
        xf = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).half().float() * norm_w.half().float()
    ref = xf.double() @ dense.double().t()
    if fold == "residual":
        residual = torch.randn(1, 96).half()
        kwargs = {"residual": residual.to(DEVICE).clone()}
        ref = ref + residual.double()
    if fold == "activate":
        gate, up = ref.half().double().chunk(2, -1)
        ref = torch.nn.functional.silu(gate) * up
        kwargs = {"activate": True}
    out = gemv(x.to(DEVICE), **on, **kwargs).double().cpu()
    assert rel_err(out, ref) < 3e-3


@pytest.mark.parametrize("e8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [2, 17])
@pytest.mark.parametrize("k", [512, 1024])
def test_fp4_tensor_core_matmul_matches_the_dequantized_weights(e8m0, dtype, rows, k):
    """Slices of 16 (MXFP4's group of 32 spans two) or 128 columns (whole groups: 64 columns a dot, their
    groups' scales spread over them in registers)."""
    from sageinfer.ops.gemv_int4 import w4a16_mma_matmul
    group = 32 if e8m0 else 16
    x, dense, on = _fp4_case(80, k, group, e8m0, dtype, rows=rows)
    out = w4a16_mma_matmul(x.to(DEVICE), on["weight"], on["weight_scale"], None, group, on["slice_width"],
                           fp4=on["fp4"], row_scale=on["row_scale"])
    ref = x.double() @ dense.double().t()
    assert out.dtype == dtype and rel_err(out.double().cpu(), ref) < (2e-3 if dtype == torch.float16 else 1e-5)


def test_fp4_one_row_keeps_large_and_small_inputs():
    """fp16 sums with the values times 2^-14: inputs of 30,000 or 1e-6 keep fp16's relative precision (row
    scales keep the outputs inside fp16's range)."""
    from sageinfer.ops.gemv import gemv
    x, dense, on = _fp4_case(64, 1024, 16, False, torch.float16)
    row_scale = on["row_scale"]
    for factor, outputs in ((3e4 / x.abs().max().item(), 1e-4), (1e-6, 1.0)):
        xs = (x.float() * factor).half()
        ref = xs.double() @ (dense.double() * outputs).t()
        on["row_scale"] = row_scale * outputs
        assert rel_err(gemv(xs.to(DEVICE), **on).double().cpu(), ref) < 3e-3
