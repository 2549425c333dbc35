"""ops/int4_gemm.py: the GEMM on 4-bit words for batches past the skinny kernels' rows, against x times
the weight the words encode. (tl.dot in bf16 is wrong in the interpreter: fp32 and fp16 there.)"""
import pytest
import torch

from sageinfer.ops.int4_gemm import int4_gemm
from sageinfer.ops.weight_only import dequantize, pack
from kernels_util import DEVICE, TOL, rel_err

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, group, slice_width, block_n, block_m, programs", [
    (33, 72, 256, 32, 16, 64, None, 0),  # partial tiles of rows and outputs, 8 slices in 8 groups
    (70, 128, 512, 128, 32, 32, 32, 0),  # runs of 16 words in slices of 32: two runs a slice
    (40, 96, 1024, 64, 32, 32, 16, 64),  # 12 tiles, K split in 6 parts for 64 programs
    (5, 40, 256, 16, 16, 16, 16, 0)])
def test_the_gemm_on_4bit_words_is_x_times_their_weight(m, n, k, group, slice_width, block_n, block_m, programs,
                                                         dtype):
    gen = torch.Generator().manual_seed(m + n + k)
    packed = pack(torch.randint(0, 16, (n, k), generator=gen), slice_width)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    zeros = torch.randint(-3, 4, (n, k // group), generator=gen).to(torch.int32)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = int4_gemm(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, slice_width,
                  block_n=block_n, block_m=block_m, min_programs=programs)
    ref = x.double() @ dequantize(packed, scales, zeros, group, dtype, slice_width).double().t()
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y.cpu(), ref) < (1e-6 if dtype == torch.float32 and DEVICE == "cpu" else TOL[dtype])


def test_runs_must_lie_within_a_slice():
    packed = pack(torch.randint(0, 16, (8, 128)), 8)
    with pytest.raises(ValueError, match="within a slice"):
        int4_gemm(torch.zeros(40, 128), packed, torch.ones(8, 4), torch.zeros(8, 4, dtype=torch.int32), 32, 8)
