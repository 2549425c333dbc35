"""Decode-batch matmul against torch (interpreter on CPU in fp32/fp16, compiled on the GPU)."""
import pytest
import torch

from sageinfer.ops.skinny_gemm import skinny_gemm
from kernels_util import DEVICE, TOL, rel_err

SMALL = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,bias", [(20, 70, 64, False), (33, 64, 100, True), (16, 32, 32, False)])
def test_skinny_gemm_matches_torch(dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    out = skinny_gemm(x, w, b, config=SMALL)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]


def test_skinny_gemm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shared"):
        skinny_gemm(torch.zeros(4, 8, device=DEVICE), torch.zeros(3, 9, device=DEVICE))
