"""ops/gemv_words.py: one-row weights read as words of four (FP8 and INT8 with a scale per row, 16-bit
weights) against float64 and ops/gemv.py's element-wise kernel, in every fusion the decode step uses."""
import pytest
import torch

from sageinfer.ops.gemv import gemv
from sageinfer.ops import gemv_words
from kernels_util import DEVICE, rel_err

# 16-bit inputs of the fusions: bf16 where the kernels are compiled, fp16 in the interpreter (its bf16 rounding).
FUSED_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16
# Small tiles so that the loop takes several trips and the last one is partial.
WORDS_CONFIG = {"block_n": 4, "words": 32, "num_warps": 2, "num_stages": 2}
ELEMENTS_CONFIG = {"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 2, "elements": True}


def _weights(kind, n, k, gen, dtype):
    """(weight, its scale per row or None): 8-bit ones with their range's ends (FP8's subnormals too)."""
    full = torch.randn(n, k, generator=gen)
    if kind == "16":
        return (full / 8).to(dtype), None
    if kind == "int8":
        scale = full.abs().amax(1) / 127.0
        q = (full / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        q[0, :4] = torch.tensor([-128, 127, -1, 1], dtype=torch.int8)
        return q, scale
    scale = full.abs().amax(1) / 448.0
    q = (full / scale[:, None]).to(torch.float8_e4m3fn)
    q[0, :4] = torch.tensor([448.0, -448.0, 2.0 ** -9, -(2.0 ** -6)]).to(torch.float8_e4m3fn)
    return q, scale


def _reference(x, q, scale, mode, k, norm_w):
    inp = x.double()
    dtype = x.dtype
    if mode == "gated":
        gate, up = inp[:, :k].float(), inp[:, k:]
        inp = ((gate / (1 + torch.exp(-gate))).to(dtype) * up.to(dtype)).double()
    elif mode == "normed":
        f = x.float()
        inp = ((f * torch.rsqrt(f.pow(2).mean(1, keepdim=True) + 1e-6)).to(dtype) * norm_w).double()
    weight = q.double() if scale is None else q.double() * scale.double()[:, None]
    return inp @ weight.t()


def _call(x, q, scale, cfg, **kwargs):
    if scale is not None:
        kwargs["weight_scale"] = scale.to(DEVICE)
    return gemv(x.to(DEVICE), q.to(DEVICE), config=cfg, **kwargs).cpu()


@pytest.mark.parametrize("kind", ["e4m3", "int8", "16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("mode", ["plain", "gated", "normed", "residual"])
def test_words_match_float64_and_the_element_wise_kernel(mode, rows, dtype, kind):
    if DEVICE == "cpu" and dtype == torch.bfloat16 and mode != "plain":
        pytest.skip("the Triton interpreter rounds to bf16 unreliably (silu, the norm); bf16's bits are read in plain")
    gen = torch.Generator().manual_seed(rows * 10 + len(mode))
    n, k = 22, 360  # 22 rows, 4 a program: the last program's rows are masked; 90 words: a partial trip
    q, scale = _weights(kind, n, k, gen, dtype)
    x = (2 * torch.randn(rows, 2 * k if mode == "gated" else k, generator=gen)).to(dtype)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    kwargs = {"norm_weight": norm_w.to(DEVICE), "eps": 1e-6} if mode == "normed" else {}
    if mode == "gated":
        kwargs["gated"] = True
    base = torch.randn(rows, n, generator=gen).to(dtype)
    calls = {}
    for name, cfg in (("words", WORDS_CONFIG), ("elements", ELEMENTS_CONFIG)):
        if mode == "residual":
            kwargs["residual"] = base.clone().to(DEVICE)
        calls[name] = _call(x, q, scale, cfg, **kwargs)
    ref = _reference(x, q, scale, mode, k, norm_w)
    if mode == "residual":
        ref = ref + base.double()
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-3
    assert calls["words"].dtype == dtype and calls["words"].shape == (rows, n)
    assert rel_err(calls["words"].float(), ref) < tol
    # Same products, summed in another order: the two kernels agree to the output's rounding.
    assert rel_err(calls["words"].float(), calls["elements"].double()) < tol


@pytest.mark.parametrize("kind", ["e4m3", "int8", "16"])
@pytest.mark.parametrize("normed", [False, True])
def test_words_hand_out_silu_of_gate_times_up(normed, kind):
    from sageinfer.ops.activation import silu_and_mul
    gen = torch.Generator().manual_seed(3 + normed)
    half, k = 11, 256
    q, scale = _weights(kind, 2 * half, k, gen, FUSED_DTYPE)
    x = torch.randn(1, k, generator=gen).to(FUSED_DTYPE)
    kwargs = {}
    if normed:
        kwargs.update(norm_weight=(torch.rand(k, generator=gen) + 0.5).to(FUSED_DTYPE).to(DEVICE), eps=1e-6)
    activated = _call(x, q, scale, WORDS_CONFIG, activate=True, **kwargs)
    assert torch.equal(activated, silu_and_mul(_call(x, q, scale, WORDS_CONFIG, **kwargs).to(DEVICE)).cpu())


def test_words_take_the_norm_over_several_trips():
    """K past the norm's first chunk of columns: its sum of squares spans every trip."""
    gen = torch.Generator().manual_seed(5)
    k = 4 * WORDS_CONFIG["words"] * 3 + 8
    q, scale = _weights("e4m3", 8, k, gen, FUSED_DTYPE)
    x = (3 * torch.randn(1, k, generator=gen)).to(FUSED_DTYPE)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(FUSED_DTYPE)
    out = _call(x, q, scale, WORDS_CONFIG, norm_weight=norm_w.to(DEVICE), eps=1e-6)
    assert rel_err(out.float(), _reference(x, q, scale, "normed", k, norm_w)) < 8e-3


def test_float32_logits_are_rounded_through_the_input_dtype():
    """The LM head's call: float32 out, values rounded as the model's dtype rounds them first."""
    gen = torch.Generator().manual_seed(6)
    q, _ = _weights("16", 40, 128, gen, FUSED_DTYPE)
    x = torch.randn(1, 128, generator=gen).to(FUSED_DTYPE)
    out = _call(x, q, None, WORDS_CONFIG, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, _call(x, q, None, WORDS_CONFIG).float())


def test_words_leave_what_they_cannot_read_to_the_element_wise_kernel(monkeypatch):
    """fp32 inputs, 16-bit weights of another dtype than the input, a row that starts off an 8-byte
    boundary, K not in whole words: the element-wise kernel takes them (the words kernel is never
    launched) and the answer is the same product."""
    launched = []
    real = gemv_words.gemv_words
    monkeypatch.setattr(gemv_words, "gemv_words", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(9)
    q, scale = _weights("e4m3", 12, 128, gen, None)
    wide = torch.randn(1, 136, generator=gen).to(FUSED_DTYPE).to(DEVICE)
    for x in (wide[:, :128].float(), wide[:, 1:129]):
        out = gemv(x, q.to(DEVICE), weight_scale=scale.to(DEVICE)).cpu()
        assert rel_err(out.float(), x.cpu().double() @ (q.double() * scale.double()[:, None]).t()) < 8e-3
    other = torch.float16 if FUSED_DTYPE == torch.bfloat16 else torch.bfloat16
    gemv(wide[:, :128].to(other), (torch.randn(12, 128, generator=gen) / 8).to(FUSED_DTYPE).to(DEVICE))
    q6, scale6 = _weights("e4m3", 12, 126, gen, None)
    gemv(wide[:, :126], q6.to(DEVICE), weight_scale=scale6.to(DEVICE))
    assert not launched
    gemv(wide[:, 4:132], q.to(DEVICE), weight_scale=scale.to(DEVICE))
    assert launched == [1]


def test_reads_words_answers_by_dtypes_and_scales(monkeypatch):
    """The model's question (does a one-row matmul of these weights take the word kernel?) follows the
    kernel's own rules: per-row scales only for 8-bit weights, none for 16-bit ones of the input's dtype,
    16-bit inputs, rows of whole words; SAGEINFER_GEMV_WORDS=0 answers no."""
    fp8 = torch.zeros(8, 64, dtype=torch.float8_e4m3fn)
    row_scale, group_scale = torch.ones(8), torch.ones(8, 2)
    assert gemv_words.reads_words(fp8, row_scale, torch.bfloat16)
    assert gemv_words.reads_words(fp8.view(torch.int8), row_scale, torch.float16)
    assert not gemv_words.reads_words(fp8, group_scale, torch.bfloat16)
    assert not gemv_words.reads_words(fp8, None, torch.bfloat16)
    assert not gemv_words.reads_words(fp8, row_scale, torch.float32)
    assert not gemv_words.reads_words(fp8[:, :62], row_scale, torch.bfloat16)
    bf16 = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert gemv_words.reads_words(bf16, None, torch.bfloat16)
    assert not gemv_words.reads_words(bf16, None, torch.float16)
    assert not gemv_words.reads_words(bf16, row_scale, torch.bfloat16)
    assert not gemv_words.reads_words(torch.zeros(8, 8, dtype=torch.int32), group_scale, torch.bfloat16)
    monkeypatch.setattr(gemv_words, "GEMV_WORDS", False)
    assert not gemv_words.reads_words(bf16, None, torch.bfloat16)
