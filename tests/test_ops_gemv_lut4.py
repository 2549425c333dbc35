"""ops/gemv_lut4.py: the few-row matmul of 4-bit table weights (bitsandbytes NF4 / FP4) against the weight
its reference expansion gives, and the bitsandbytes layer taking it up to LUT4_GEMV_MAX_ROWS rows."""
import pytest
import torch

from kernels_util import DEVICE, rel_err
from sageinfer.layers.quantization.bnb4 import BLOCK, NF4
from sageinfer.ops import gemv_lut4
from sageinfer.ops.gemv_lut4 import LUT4_GEMV_MAX_ROWS, lut4_gemv
from sageinfer.ops.lut4_weights import lut4_expand, lut4_quantize


def _weights(n: int, k: int, gen: torch.Generator, table: torch.Tensor = NF4):
    codes, absmax = lut4_quantize(torch.randn(n, k, generator=gen), table, BLOCK)
    return codes, absmax, table


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(48, 256), (37, 192), (16, 704)])
def test_the_table_matmul_is_x_times_the_expanded_weight(rows, n, k):
    """Ragged output tiles (37), K past the last whole step of scale blocks (192, 704), every row count."""
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    codes, absmax, table = _weights(n, k, gen, torch.randn(16, generator=gen))
    x = torch.randn(rows, k, generator=gen)
    ref = x.double() @ lut4_expand(codes, absmax, table, BLOCK, torch.float32).double().t()
    out = lut4_gemv(x.to(DEVICE), codes.to(DEVICE), absmax.to(DEVICE), table.to(DEVICE), BLOCK)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) < (1e-6 if DEVICE == "cpu" else 1e-5)
    half = lut4_gemv(x.to(DEVICE, torch.bfloat16), codes.to(DEVICE), absmax.to(DEVICE), table.to(DEVICE), BLOCK)
    assert half.dtype == torch.bfloat16
    assert rel_err(half.cpu(), x.to(torch.bfloat16).double() @ lut4_expand(codes, absmax, table, BLOCK,
                                                                           torch.float32).double().t()) < 8e-3


@pytest.mark.parametrize("tile", [(8, 2, 4, 1), (4, 8, 2, 1), (16, 4, 4, 0)])
def test_each_tile_and_the_codes_requested_a_step_ahead_give_the_same_product(tile):
    gen = torch.Generator().manual_seed(7)
    codes, absmax, table = _weights(40, 704, gen)
    x = torch.randn(3, 704, generator=gen)
    ref = x.double() @ lut4_expand(codes, absmax, table, BLOCK, torch.float32).double().t()
    out = lut4_gemv(x.to(DEVICE), codes.to(DEVICE), absmax.to(DEVICE), table.to(DEVICE), BLOCK, tile)
    assert rel_err(out.cpu(), ref) < (1e-6 if DEVICE == "cpu" else 1e-5)


def test_more_rows_than_the_kernel_takes_are_refused():
    gen = torch.Generator().manual_seed(0)
    codes, absmax, table = _weights(16, 128, gen)
    with pytest.raises(ValueError, match="at most"):
        lut4_gemv(torch.zeros(LUT4_GEMV_MAX_ROWS + 1, 128), codes, absmax, table, BLOCK)
    with pytest.raises(ValueError, match="against codes"):
        lut4_gemv(torch.zeros(1, 64), codes, absmax, table, BLOCK)


@pytest.mark.parametrize("rows", [1, 2, LUT4_GEMV_MAX_ROWS, LUT4_GEMV_MAX_ROWS + 1, 40])
def test_a_bitsandbytes_layer_takes_the_table_matmul_up_to_its_rows(rows, monkeypatch):
    from sageinfer.layers.linear import Linear
    from sageinfer.layers.quantization import QuantConfig, set_quant_config
    from sageinfer.layers.quantization import bnb4
    calls = []
    kernel = gemv_lut4.lut4_gemv
    monkeypatch.setattr(bnb4, "lut4_gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or kernel(*a, **kw))
    set_quant_config(QuantConfig("bnb4", "group", False, True, group_size=64, format="bitsandbytes"))
    try:
        layer = Linear(128, 40)
    finally:
        set_quant_config(None)
    gen = torch.Generator().manual_seed(rows)
    codes, absmax, table = _weights(40, 128, gen)
    for name, tensor in (("weight", codes), ("weight_absmax", absmax), ("weight_table", table)):
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    layer.process_after_loading()
    layer.to(DEVICE).use_triton = True
    x = torch.randn(rows, 128, generator=gen)
    ref = x.double() @ lut4_expand(codes, absmax, table, BLOCK, torch.float32).double().t()
    assert rel_err(layer(x.to(DEVICE)).cpu(), ref) < (1e-6 if DEVICE == "cpu" else 2e-3)
    assert calls == ([rows] if rows <= LUT4_GEMV_MAX_ROWS else [])
