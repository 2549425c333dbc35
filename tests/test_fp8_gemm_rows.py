"""FP8 W8A8 layers give the library GEMM a taller input where the platform says it is faster
(platform.fp8_gemm_rows): the kernels that write the 8-bit input allocate the extra rows and leave them
unwritten, and the layer drops their products, so nothing a model computes changes."""
import numpy as np
import pytest
import torch

from kernels_util import DEVICE
from prompt_scores import prompt_scores
from sageinfer.layers.quantization.w8a8 import _ACT_HALF_RANGE
from sageinfer.ops.quantize import quantize_rows_kernel
from sageinfer.ops.quantize_fused import rms_norm_quantize, silu_and_mul_quantize
from sageinfer.platforms import cuda


def _rows(m, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen) * 3).to(torch.float16).to(DEVICE)


def _bits(t):
    """A tensor's bits, comparable with torch.equal (which FP8 tensors are not)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _first_rows_same(padded, plain, rows_out):
    """(8-bit rows, scales) allocated rows_out tall hold the unpadded call's rows first, bit for bit."""
    for p, u in zip(padded, plain):
        assert p.shape[0] == rows_out and p.shape[1:] == u.shape[1:]
        assert torch.equal(_bits(p[:u.shape[0]]), _bits(u))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_taller_outputs_hold_the_same_rows(scheme):
    half = _ACT_HALF_RANGE[scheme]
    x, gate_up = _rows(5, 64, 1), _rows(5, 192, 2)
    weight = torch.ones(64, dtype=torch.float16, device=DEVICE)
    _first_rows_same(quantize_rows_kernel(x, scheme, half, rows_out=16), quantize_rows_kernel(x, scheme, half), 16)
    _first_rows_same(rms_norm_quantize(x, weight, 1e-6, scheme, half, x, rows_out=16)[:2],
                     rms_norm_quantize(x, weight, 1e-6, scheme, half, x)[:2], 16)
    _first_rows_same(silu_and_mul_quantize(gate_up, scheme, half, rows_out=16),
                     silu_and_mul_quantize(gate_up, scheme, half), 16)
    # fewer rows than the input's: the input's count
    assert quantize_rows_kernel(x, scheme, half, rows_out=2)[0].shape == (5, 64)


def test_cuda_pads_to_the_row_alignment(monkeypatch):
    platform = cuda.CudaPlatform.__new__(cuda.CudaPlatform)  # the rule only: no device is touched
    assert [platform.fp8_gemm_rows(m) for m in (1, 128, 129, 200, 256, 264, 16384)] == [
        128, 128, 256, 256, 256, 384, 16384]
    monkeypatch.setattr(cuda, "FP8_GEMM_ROW_ALIGN", 1)
    assert platform.fp8_gemm_rows(200) == 200


def test_an_fp8_model_scores_the_same_with_padded_gemm_inputs(llama_dir, tmp_path, monkeypatch):
    """Every FP8 layer of a prompt's step (q/k/v and gate/up from the norm kernel, the down projection from
    the activation kernel, o_proj from the quantization kernel) gets a padded input, and the prompt's scores
    and tokens are those of unpadded inputs (exactly, where the matmul does not depend on the row count)."""
    from quant_checkpoints import write_compressed_tensors
    from sageinfer.layers.quantization.w8a8 import W8A8Method
    from sageinfer.platforms import get_platform
    path = write_compressed_tensors(llama_dir, str(tmp_path / "fp8"), "fp8", "channel", True)
    prompt = np.random.default_rng(3).integers(3, 500, size=20).tolist()
    gemm_rows = []
    matmul = W8A8Method._matmul
    monkeypatch.setattr(W8A8Method, "_matmul",
                        lambda self, xq, *a, **k: gemm_rows.append(xq.shape[0]) or matmul(self, xq, *a, **k))
    runs = {}
    for align in (1, 32):
        monkeypatch.setattr(type(get_platform()), "fp8_gemm_rows", lambda self, rows: -(-rows // align) * align)
        gemm_rows.clear()
        scores, tokens, llm = prompt_scores(path, prompt, "bfloat16" if DEVICE == "cuda" else "float16")
        layers = len(llm.engine.runner.model.model.layers)
        # the prompt's step: four GEMMs a layer, padded from 20 rows to 32 where the platform asks
        assert gemm_rows[:4 * layers] == [20 if align == 1 else 32] * (4 * layers)
        runs[align] = (scores, tokens)
    if DEVICE == "cuda":  # the library may pick another kernel for 32 rows, summing in another order
        assert runs[1][1] == runs[32][1]
        assert np.allclose(runs[1][0], runs[32][0], atol=2e-2)
    else:
        assert runs[1] == runs[32]
