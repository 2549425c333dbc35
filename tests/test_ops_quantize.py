"""The fused per-row activation quantization against the torch reference of the W8A8 layers."""
import pytest
import torch

from kernels_util import DEVICE
from sageinfer.layers.quantization.w8a8 import _ACT_HALF_RANGE, quantize_rows, quantize_with
from sageinfer.ops.quantize import quantize_rows_kernel, row_launch


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("m, k, dtype", [(1, 4096, torch.bfloat16), (7, 3000, torch.bfloat16), (33, 64, torch.float32),
                                         (0, 128, torch.bfloat16), (3, 20000, torch.bfloat16),
                                         (300, 200, torch.float32)])
def test_dynamic_rows_match_the_reference(scheme, m, k, dtype):
    gen = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 8).to(dtype)
    if m:
        x[0, k // 2] = 30.0  # an outlier sets its row's scale
    q, scale = quantize_rows_kernel(x.to(DEVICE), scheme, _ACT_HALF_RANGE[scheme])
    ref_q, ref_scale = quantize_rows(x, scheme, activations=True)
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and scale.shape == (m, 1)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    assert torch.equal(q.cpu().float(), ref_q.float())


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("k", [256, 20000])  # a row held whole; a wide one in blocks
def test_a_static_scale_serves_every_row(scheme, k):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16) * 4
    static = torch.tensor([0.05])
    q, scale = quantize_rows_kernel(x.to(DEVICE), scheme, _ACT_HALF_RANGE[scheme], static.to(DEVICE))
    assert torch.equal(scale.cpu(), torch.full((5, 1), 0.05))
    ref = quantize_with(x, static.view(1, 1).expand(5, 1), scheme)
    assert torch.equal(q.cpu().float(), ref.float())  # values past the range saturate alike


def test_strided_input_is_refused():
    with pytest.raises(ValueError, match="contiguous rows"):
        quantize_rows_kernel(torch.zeros(4, 8, device=DEVICE).t(), "fp8", 448.0)


def test_few_rows_are_read_once_and_many_or_wide_rows_in_blocks():
    assert row_launch(4096, 256) == {"BLOCK": 4096, "WHOLE_ROW": True, "num_warps": 4}
    assert row_launch(12288, 1)["num_warps"] == 16
    assert row_launch(4096, 257) == {"BLOCK": 2048, "WHOLE_ROW": False, "num_warps": 4}
    assert row_launch(64, 1000)["BLOCK"] == 64 and not row_launch(20000, 1)["WHOLE_ROW"]
