"""ops/widen_pages.py against torch: listed pages of an FP8 or INT8 cache copied out in 16 bits, each value
times its scale; an INT8 scale no write has set (NaN, inf) counts as 0."""
import pytest
import torch

from kernels_util import DEVICE
from sageinfer.attention.backend import new_kv_scales
from sageinfer.ops.widen_pages import widen_pages

# The Triton interpreter computes bf16 arithmetic wrongly (the CPU suite's kernels run in it): bf16 on GPUs only.
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
PAGES = [5, 0, 3, 5]  # any order, a page listed twice


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8_scale", [1.0, 0.5])
def test_fp8_pages_widen_times_the_cache_scale(dtype, fp8_scale):
    gen = torch.Generator().manual_seed(1)
    cache = (torch.randn(6, 16, 3, 32, generator=gen) * 4).to(torch.float8_e4m3fn).to(DEVICE)
    pages = torch.tensor(PAGES, dtype=torch.int64, device=DEVICE)
    out = widen_pages(cache, pages, dtype, fp8_scale)
    assert torch.equal(out, (cache[pages].float() * fp8_scale).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_major", [False, True])
def test_int8_pages_widen_times_their_token_scales(dtype, head_major):
    gen = torch.Generator().manual_seed(2)
    cache = torch.randint(-128, 128, (6, 16, 3, 32), generator=gen, dtype=torch.int8).to(DEVICE)
    scales = new_kv_scales(6, 16, 3, DEVICE) if head_major else torch.zeros(6, 16, 3, device=DEVICE)
    scales.copy_(torch.rand(6, 16, 3, generator=gen) / 50)
    scales[5, 9] = float("nan")  # rows no write set
    scales[3, 15, 1] = float("inf")
    pages = torch.tensor(PAGES, dtype=torch.int64, device=DEVICE)
    out = widen_pages(cache, pages, dtype, scale=scales)
    clean = torch.nan_to_num(scales[pages], nan=0.0, posinf=0.0, neginf=0.0)
    assert torch.equal(out, (cache[pages].float() * clean.unsqueeze(-1)).to(dtype))
    assert not out.isnan().any()


def test_no_pages_and_wrong_caches():
    cache = torch.zeros(2, 16, 1, 32, dtype=torch.float8_e4m3fn, device=DEVICE)
    assert widen_pages(cache, torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.float16).shape == (0, 16, 1, 32)
    with pytest.raises(ValueError, match="INT8"):
        widen_pages(cache.view(torch.int8), torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.float16)
    with pytest.raises(ValueError):
        widen_pages(torch.zeros(2, 16, 1, 32, dtype=torch.float16, device=DEVICE),
                    torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.float16)
