"""The fused per-row activation quantization against the torch reference of the W8A8 layers."""
import pytest
import torch
import triton
import triton.language as tl

from kernels_util import DEVICE
from sageinfer.layers.quantization.w8a8 import _ACT_HALF_RANGE, quantize_rows, quantize_with
from sageinfer.ops.quantize import quantize_rows_kernel, quotient, row_launch


def _same_bits(q, ref):
    assert q.dtype == ref.dtype and q.shape == ref.shape
    assert torch.equal(q.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("m, k, dtype", [(1, 4096, torch.bfloat16), (7, 3000, torch.bfloat16), (33, 64, torch.float32),
                                         (0, 128, torch.bfloat16), (3, 20000, torch.bfloat16),
                                         (300, 200, torch.float32)])
def test_dynamic_rows_match_the_reference(scheme, m, k, dtype):
    gen = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 8).to(dtype)
    if m:
        x[0, k // 2] = 30.0  # an outlier sets its row's scale
        x[0, :3] = torch.tensor([-0.0, -1e-6, 1e-6])  # zeros of either sign, kept (FP8 stores the sign)
    q, scale = quantize_rows_kernel(x.to(DEVICE), scheme, _ACT_HALF_RANGE[scheme])
    ref_q, ref_scale = quantize_rows(x, scheme, activations=True)
    assert scale.shape == (m, 1)
    assert torch.equal(scale.cpu(), ref_scale)
    _same_bits(q, ref_q)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("k", [256, 20000])  # a row held whole; a wide one in blocks
def test_a_static_scale_serves_every_row(scheme, k):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16) * 4
    static = torch.tensor([0.05])
    q, scale = quantize_rows_kernel(x.to(DEVICE), scheme, _ACT_HALF_RANGE[scheme], static.to(DEVICE))
    assert torch.equal(scale.cpu(), torch.full((5, 1), 0.05))
    ref = quantize_with(x, static.view(1, 1).expand(5, 1), scheme)
    _same_bits(q, ref)  # values past the range saturate alike


def test_strided_input_is_refused():
    with pytest.raises(ValueError, match="contiguous rows"):
        quantize_rows_kernel(torch.zeros(4, 8, device=DEVICE).t(), "fp8", 448.0)


def test_rows_are_read_once_unless_too_wide():
    assert row_launch(4096) == {"BLOCK": 4096, "WHOLE_ROW": True, "num_warps": 4}
    assert row_launch(12288) == {"BLOCK": 16384, "WHOLE_ROW": True, "num_warps": 16}
    assert row_launch(64)["BLOCK"] == 64
    assert row_launch(20000) == {"BLOCK": 2048, "WHOLE_ROW": False, "num_warps": 4}


@triton.jit
def _quotient_kernel(y_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, quotient(y, scale, tl.math.div_rn(1.0, scale)), mask=mask)


def test_the_quotient_from_the_inverse_is_the_ieee_quotient():
    """quotient() against torch's division, bit for bit: scales of every mantissa (those near 2, where the
    inverse's product is furthest off, on purpose), values up to the row's absmax, and zeros of either sign."""
    gen = torch.Generator().manual_seed(11)
    n = 1 << 16
    amax = torch.rand(n, generator=gen) * 10.0 ** (torch.rand(n, generator=gen) * 12 - 6)
    scale = amax.clamp(min=1e-12) / 448.0
    scale[: n // 4] = (1.999 + 0.001 * torch.rand(n // 4, generator=gen)) * 2.0 ** torch.randint(
        -30, 10, (n // 4,), generator=gen).float()
    y = (torch.rand(n, generator=gen) * 2 - 1) * scale * 448.0
    y[n // 4: n // 2] = y[n // 4: n // 2].bfloat16().float()
    y[-4:] = torch.tensor([0.0, -0.0, 1e-40, -1e-40])
    out = torch.empty(n, device=DEVICE)
    _quotient_kernel[(n // 1024,)](y.to(DEVICE), scale.to(DEVICE), out, n, BLOCK=1024)
    assert torch.equal(out.cpu().view(torch.int32), (y / scale).view(torch.int32))
