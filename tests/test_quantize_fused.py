"""RMSNorm and SiLU-and-mul writing a W8A8 layer's 8-bit input (ops/quantize_fused.py): the same bits as
the unfused kernels followed by the per-row quantization kernel, and a model takes them in its 8-bit layers
without a change to what it computes."""
import numpy as np
import pytest
import torch

from kernels_util import DEVICE
from prompt_scores import prompt_scores
from ranks import needs_ranks
from sageinfer.layers.quantization.w8a8 import _ACT_HALF_RANGE
from sageinfer.ops.activation import silu_and_mul
from sageinfer.ops.quantize import quantize_rows_kernel, row_launch
from sageinfer.ops.quantize_fused import rms_norm_quantize, silu_and_mul_quantize, silu_launch
from sageinfer.ops.rms_norm import rms_norm


# The Triton interpreter computes bf16 arithmetic wrongly (the CPU suite's kernels run in it): bf16 on GPUs only.
DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _rows(m, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 6).to(dtype)
    if m:
        x[0, k // 3] = 40.0  # an outlier sets its row's scale
    return x.to(DEVICE)


def _same_bits(q, scale, ref_q, ref_scale):
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and scale.shape == ref_scale.shape
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norm_writes_the_bits_of_norm_then_quantization(scheme, dtype, hidden, with_residual):
    x = _rows(6, hidden, dtype, hidden)
    residual = _rows(6, hidden, dtype, hidden + 1) if with_residual else None
    weight = (torch.rand(hidden, generator=torch.Generator().manual_seed(5)) + 0.5).to(dtype).to(DEVICE)
    q, scale, new_residual = rms_norm_quantize(x, weight, 1e-6, scheme, _ACT_HALF_RANGE[scheme], residual)
    if with_residual:
        normed, ref_residual = rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(new_residual, ref_residual)
    else:
        normed = rms_norm(x, weight, 1e-6)
        assert new_residual is None
    _same_bits(q, scale, *quantize_rows_kernel(normed, scheme, _ACT_HALF_RANGE[scheme]))


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", DTYPES)
# rows held whole as three blocks (96, 2,088), as one (100); a wide row read in blocks
@pytest.mark.parametrize("d", [96, 100, 2048 + 40, 16384 + 40])
def test_activation_writes_the_bits_of_activation_then_quantization(scheme, dtype, d):
    gate_up = _rows(5, 2 * d, dtype, d)
    q, scale = silu_and_mul_quantize(gate_up, scheme, _ACT_HALF_RANGE[scheme])
    _same_bits(q, scale, *quantize_rows_kernel(silu_and_mul(gate_up), scheme, _ACT_HALF_RANGE[scheme]))


def test_activation_rows_take_three_blocks_where_they_cover_them():
    assert silu_launch(12288) == {"BLOCK": 4096, "WHOLE_ROW": True, "THIRDS": True, "num_warps": 16}
    assert silu_launch(96)["THIRDS"] and silu_launch(96)["BLOCK"] == 32
    assert silu_launch(100) == {**row_launch(100), "THIRDS": False}
    assert silu_launch(16384) == {**row_launch(16384), "THIRDS": False}
    assert silu_launch(20000) == {**row_launch(20000), "THIRDS": False}


def test_no_rows_give_empty_outputs():
    x = torch.zeros(0, 64, dtype=torch.float16, device=DEVICE)
    q, scale, residual = rms_norm_quantize(x, torch.ones(64, dtype=torch.float16, device=DEVICE), 1e-6, "fp8", 448.0, x)
    assert q.shape == (0, 64) and scale.shape == (0, 1) and residual.shape == (0, 64)
    q, scale = silu_and_mul_quantize(torch.zeros(0, 128, device=DEVICE), "int8", 127.5)
    assert q.shape == (0, 64) and scale.shape == (0, 1)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_a_w8a8_model_takes_its_8_bit_inputs_from_the_norm_and_activation_kernels(llama_dir, tmp_path, scheme,
                                                                                  monkeypatch):
    """Through the platform's kernels, a multi-row step's q/k/v and gate/up layers take their input from the
    norm kernel and the down projection from the activation kernel, already quantized; the prompt scores
    exactly as with the norm, the activation and the quantization launched apart."""
    from quant_checkpoints import write_compressed_tensors
    from sageinfer.ops import quantize_fused
    from sageinfer.layers.quantization.w8a8 import W8A8Method
    path = write_compressed_tensors(llama_dir, str(tmp_path / scheme), scheme, "channel", True)
    prompt = np.random.default_rng(1).integers(3, 500, size=20).tolist()
    runs = {}
    for fused in (True, False):
        calls = []
        for name in ("rms_norm_quantize", "silu_and_mul_quantize"):
            original = getattr(quantize_fused, name)
            monkeypatch.setattr(quantize_fused, name,
                                lambda *a, name=name, original=original, **k: calls.append(name) or original(*a, **k))
        if not fused:
            monkeypatch.setattr(W8A8Method, "fused_input", lambda self, layer: None)
        scores, tokens, llm = prompt_scores(path, prompt, str(DTYPES[-1]).removeprefix("torch."))
        layers = len(llm.engine.runner.model.model.layers)
        if fused:  # the prompt's step: two norms and one activation a layer
            assert calls.count("rms_norm_quantize") == 2 * layers and calls.count("silu_and_mul_quantize") == layers
        else:
            assert not calls
        runs[fused] = (scores, tokens)
    assert runs[True] == runs[False]


@needs_ranks(2)
def test_tp2_w8a8_takes_fused_inputs_as_unfused(llama_dir, tmp_path, monkeypatch):
    """At tp=2 every rank's q/k/v and gate/up layers take their part's input from the norm kernel, and the
    row-parallel down projection its part of the activation, quantized by that rank: the same scores as the
    separate launches on each rank."""
    from quant_checkpoints import write_compressed_tensors
    from sageinfer.layers.quantization import w8a8
    path = write_compressed_tensors(llama_dir, str(tmp_path / "int8"), "int8", "channel", True)
    prompt = np.random.default_rng(2).integers(3, 500, size=16).tolist()
    runs = {}
    for fused in (True, False):
        monkeypatch.setenv("SAGEINFER_FUSED_QUANTIZE", "1" if fused else "0")  # the ranks' own processes
        monkeypatch.setattr(w8a8, "FUSED_QUANTIZE", fused)  # a rank in this one
        scores, tokens, _ = prompt_scores(path, prompt, str(DTYPES[-1]).removeprefix("torch."), max_tokens=2,
                                          tensor_parallel_size=2)
        runs[fused] = (scores, tokens)
    assert runs[True] == runs[False]
