"""Skinny decode matmul against torch."""
import pytest
import torch

from sageinfer.ops.gemv import gemv
from kernels_util import DEVICE, rel_err


@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 256, False), (3, 33, 200, True), (8, 64, 512, False),
                                        (2, 17, 96, True)])
def test_gemv_matches_torch(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * 100 + n)
    x = torch.randn(m, k, generator=gen).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    out = gemv(x, w, b, config={"block_n": 16, "block_k": 128, "num_warps": 4, "num_stages": 2})
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    assert out.shape == (m, n) and rel_err(out, ref) < 1e-5


def test_gemv_refuses_too_many_rows():
    with pytest.raises(ValueError, match="up to 8 rows"):
        gemv(torch.zeros(9, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE))


@pytest.mark.parametrize("k", [256, 200])
def test_gated_gemv_equals_silu_and_mul_then_gemv(k):
    from sageinfer.ops.activation import silu_and_mul
    gen = torch.Generator().manual_seed(k)
    gate_up = torch.randn(1, 2 * k, generator=gen).to(DEVICE)
    w = torch.randn(24, k, generator=gen).to(DEVICE)
    cfg = {"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 2}
    fused = gemv(gate_up, w, config=cfg, gated=True)
    ref = torch.nn.functional.linear(silu_and_mul(gate_up).double(), w.double())
    assert rel_err(fused, ref) < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        gemv(gate_up, w, config=cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_with_folded_norm_equals_rms_norm_then_gemv(dtype):
    from sageinfer.layers.norm import rms_norm_ref
    gen = torch.Generator().manual_seed(7)
    k = 200  # three chunks of 64 and a tail: the norm passes over chunks beyond the first two
    x = (3 * torch.randn(1, k, generator=gen)).to(dtype).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(DEVICE)
    w = torch.randn(40, k, generator=gen).to(dtype).to(DEVICE)
    cfg = {"block_n": 8, "block_k": 64, "num_warps": 4, "num_stages": 2}
    out = gemv(x, w, config=cfg, norm_weight=norm_w, eps=1e-6)
    normed = rms_norm_ref(x.cpu(), norm_w.cpu(), 1e-6)
    ref = torch.nn.functional.linear(normed.double(), w.cpu().double())
    assert rel_err(out.cpu(), ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    with pytest.raises(ValueError, match="not normalised"):
        gemv(torch.cat([x, x], 1), w, gated=True, norm_weight=norm_w)


@pytest.mark.parametrize("gated", [False, True])
def test_gemv_adds_into_residual_in_place(gated):
    from sageinfer.ops.activation import silu_and_mul
    gen = torch.Generator().manual_seed(11)
    k, n = 96, 36
    x = torch.randn(1, 2 * k if gated else k, generator=gen).to(DEVICE)
    w = torch.randn(n, k, generator=gen).to(DEVICE)
    residual = torch.randn(1, n, generator=gen).to(DEVICE)
    before = residual.clone()
    cfg = {"block_n": 8, "block_k": 64, "num_warps": 4, "num_stages": 2}
    out = gemv(x, w, config=cfg, gated=gated, residual=residual)
    inner = silu_and_mul(x) if gated else x
    ref = before.double() + torch.nn.functional.linear(inner.double(), w.double())
    assert out.data_ptr() == residual.data_ptr() and rel_err(residual, ref) < 1e-5
    with pytest.raises(ValueError, match="does not fit"):
        gemv(x, w, gated=gated, residual=torch.zeros(1, n + 1, device=DEVICE))


def test_gemv_float32_output_is_rounded_through_the_weight_dtype():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 128, generator=gen).to(torch.float16).to(DEVICE)
    w = torch.randn(24, 128, generator=gen).to(torch.float16).to(DEVICE)
    cfg = {"block_n": 8, "block_k": 64, "num_warps": 4, "num_stages": 2}
    out = gemv(x, w, config=cfg, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, gemv(x, w, config=cfg).float())


@pytest.mark.parametrize("wdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_reads_8bit_weights_with_a_scale_per_row(wdtype, gated):
    """An FP8 or INT8 weight with its per-row scale: the product of the weights it encodes, rounded
    to the input's dtype (fp16 here)."""
    gen = torch.Generator().manual_seed(7)
    m, n, k = 2, 24, 256
    full = torch.randn(n, k, generator=gen)
    scale = full.abs().amax(1) / (127.0 if wdtype == torch.int8 else 448.0)
    q = (full / scale[:, None])
    q = q.round().clamp(-127, 127).to(wdtype) if wdtype == torch.int8 else q.to(wdtype)
    if wdtype == torch.int8:  # the ends of the range through the kernel's integer-to-float trick
        q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    x = torch.randn(m, 2 * k if gated else k, generator=gen).half()
    cfg = {"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 2}
    out = gemv(x.to(DEVICE), q.to(DEVICE), config=cfg, gated=gated, weight_scale=scale.to(DEVICE))
    inp = x.float()
    if gated:
        gate, up = inp[:, :k], inp[:, k:]
        inp = ((gate / (1 + torch.exp(-gate))).half() * up.half()).float()
    ref = inp.double() @ (q.double() * scale.double()[:, None]).t()
    assert out.dtype == torch.float16 and rel_err(out.float().cpu(), ref) < 2e-3
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(x.to(DEVICE), q.to(DEVICE), gated=gated, weight_scale=scale[:-1].to(DEVICE))


def _mode_input(x: torch.Tensor, k: int, mode: str, norm_w: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies in each mode, rounded as the model's fp16 ops round: the input,
    silu(gate) * up, or the RMS-normalised input scaled by norm_w (eps 1e-6)."""
    inp = x.float()
    if mode == "gated":
        gate, up = inp[:, :k], inp[:, k:]
        return ((gate / (1 + torch.exp(-gate))).half() * up.half()).float()
    if mode == "normed":
        return ((inp * torch.rsqrt(inp.pow(2).mean(1, keepdim=True) + 1e-6)).half() * norm_w).float()
    return inp


@pytest.mark.parametrize("weights, rows", [("fp8", 1), ("int8", 1), ("fp8", 3)])
@pytest.mark.parametrize("mode", ["plain", "gated", "normed", "residual", "activate"])
def test_gemv_scales_each_group_of_a_block_quantized_weight(mode, weights, rows):
    """Block FP8 and W8A16's INT8: a scale per row and group of 64 input features through
    ops/gemv_grouped.py's kernel, walking K two groups at a time where K holds ten (the norm's pass
    over x too), with each fusion; groups of other than a power of two from 16 are refused."""
    gen = torch.Generator().manual_seed(11 + rows)
    n, k, g = 24, 640, 64
    full = torch.randn(n, k, generator=gen)
    top = 448.0 if weights == "fp8" else 127.0
    scale = full.view(n, k // g, g).abs().amax(2) / top
    q = full / scale.repeat_interleave(g, 1)
    q = q.to(torch.float8_e4m3fn) if weights == "fp8" else q.round().to(torch.int8)
    x = torch.randn(rows, 2 * k if mode == "gated" else k, generator=gen).half()
    norm_w = (torch.rand(k, generator=gen) + 0.5).half()
    residual = torch.randn(rows, n, generator=gen).half()
    cfg = {"block_n": 8, "columns": 4 * g, "num_warps": 4, "num_stages": 2}
    kwargs = ({"gated": True} if mode == "gated" else {"norm_weight": norm_w.to(DEVICE), "eps": 1e-6}
              if mode == "normed" else {"residual": residual.clone().to(DEVICE)} if mode == "residual" else
              {"activate": True} if mode == "activate" else {})
    out = gemv(x.to(DEVICE), q.to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE), **kwargs)
    inp = _mode_input(x, k, "plain" if mode in ("residual", "activate") else mode, norm_w)
    ref = inp.double() @ (q.double() * scale.double().repeat_interleave(g, 1)).t()
    if mode == "residual":
        ref = ref + residual.double()
    if mode == "activate":
        ref = torch.nn.functional.silu(ref[:, :n // 2]) * ref[:, n // 2:]
    assert rel_err(out.float().cpu(), ref) < 3e-3
    with pytest.raises(ValueError, match="weight_scale"):
        gemv(x.to(DEVICE), q.to(DEVICE), weight_scale=scale.t().contiguous().to(DEVICE), **kwargs)
    with pytest.raises(ValueError, match="powers of two"):
        gemv(x.to(DEVICE), q.to(DEVICE), weight_scale=scale[:, :8].contiguous().to(DEVICE), **kwargs)


@pytest.mark.parametrize("mma", [False, "per weight", True, "split"])
@pytest.mark.parametrize("mode", ["plain", "gated", "normed", "residual"])
@pytest.mark.parametrize("zeros, rows, k, g", [(False, 1, 640, 64), (True, 1, 640, 64), (True, 3, 768, 96)])
def test_gemv_unpacks_4bit_weights_with_group_scales_and_zero_points(mode, zeros, rows, k, g, mma):
    """W4A16's packed words (eight nibbles along the input, interleaved in slices, stored plus 8)
    with a scale and, for asymmetric schemes, a zero point per row and group: the weights
    ops/weight_only.dequantize gives, with the gated input, the folded norm and the residual add;
    a group of several slices (k 640: slices of 16 in groups of 64) and groups that are not a power
    of two (k 768: slices of 32 in groups of 96). Both kernels: on the CUDA cores (each thread's four
    columns summed before their scale, or each weight scaled on its own; also split over K in 3 parts,
    the last shorter at k 640, the part that finishes last completing the output), and on the tensor
    cores (weights rounded to fp16 as the reference's dequantized fp16 weights are)."""
    from sageinfer.ops.weight_only import dequantize, pack, slice_width_for
    gen = torch.Generator().manual_seed(13 + rows)
    n = 24
    s = slice_width_for(k, g)
    assert s == (16 if k == 640 else 32)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = (torch.rand(n, k // g, generator=gen) + 0.1) / 8
    zero = torch.randint(-3, 4, (n, k // g), generator=gen, dtype=torch.int32) if zeros else None
    packed = pack(q, s)
    x = torch.randn(rows, 2 * k if mode == "gated" else k, generator=gen).half()
    norm_w = (torch.rand(k, generator=gen) + 0.5).half()
    residual = torch.randn(rows, n, generator=gen).half()
    cfg = {"block_n": 16 if mma is True else 8, "num_warps": 4, "num_stages": 1, "mma": mma is True,
           "min_programs": 12 if mma == "split" else 0, "quad_sums": mma != "per weight"}
    kwargs = ({"gated": True} if mode == "gated" else {"norm_weight": norm_w.to(DEVICE), "eps": 1e-6}
              if mode == "normed" else {"residual": residual.clone().to(DEVICE)} if mode == "residual" else {})
    out = gemv(x.to(DEVICE), packed.to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE),
               weight_zero=zero.to(DEVICE) if zeros else None, int4=True, slice_width=s, **kwargs)
    inp = _mode_input(x, k, mode, norm_w)
    weight = dequantize(packed, scale, zero if zeros else torch.zeros_like(scale, dtype=torch.int32), g,
                        torch.float64, s)
    ref = inp.double() @ weight.t()
    if mode == "residual":
        ref = ref + residual.double()
        assert out.data_ptr() == kwargs["residual"].data_ptr()
    assert rel_err(out.float().cpu(), ref) < 2e-3
    if mma == "split":  # the counts are left at zero for the next launch, which gives the same output
        from sageinfer.ops.split_k import _COUNTERS
        assert not _COUNTERS[out.device].any()
        if mode != "residual":
            again = gemv(x.to(DEVICE), packed.to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE),
                         weight_zero=zero.to(DEVICE) if zeros else None, int4=True, slice_width=s, **kwargs)
            assert torch.equal(again, out)
    with pytest.raises(ValueError, match="4-bit weights"):
        gemv(x.to(DEVICE), packed.to(DEVICE), int4=True, **kwargs)
    with pytest.raises(ValueError, match="slices"):
        gemv(x.to(DEVICE), packed.to(DEVICE), weight_scale=scale.to(DEVICE), int4=True, slice_width=1, **kwargs)
    if mma is True:
        with pytest.raises(ValueError, match="tensor-core"):
            gemv(x.to(DEVICE), packed.to(DEVICE), config=dict(cfg, block_n=8), weight_scale=scale.to(DEVICE),
                 int4=True, slice_width=s, **kwargs)


def _4bit_reference(inp, packed, scale, zero, g, s, mode, residual):
    """What a one-row 4-bit matmul should give for the input it multiplies (inp, float): the dequantized
    weights in float64, then the residual added or silu(gate) * up taken as the mode asks."""
    from sageinfer.ops.weight_only import dequantize
    zeros = zero if zero is not None else torch.zeros_like(scale, dtype=torch.int32)
    ref = inp.double() @ dequantize(packed, scale.float(), zeros, g, torch.float64, s).t()
    if mode == "residual":
        ref = ref + residual.double()
    if mode == "activate":
        half = ref.shape[1] // 2
        ref = torch.nn.functional.silu(ref[:, :half]) * ref[:, half:]
    return ref


@pytest.mark.parametrize("mode", ["plain", "normed", "residual", "activate"])
@pytest.mark.parametrize("zeros, rows, k, g", [(False, 1, 256, 16), (True, 1, 256, 16), (True, 2, 512, 512),
                                                (False, 1, 512, 128)])
def test_4bit_scales_read_once_a_run_give_the_same_output(mode, zeros, rows, k, g):
    """run_scales: where a group is one slice (k 256 in groups of 16: each row's eight scales and zero
    points in one load a run, split to slices) or a whole number of runs (channel-wise, k 512), the
    quad-sum loop reads them once a run; the output equals the per-slice reads exactly and the
    dequantized reference within fp16's rounding. Groups of several slices (k 512 in groups of 128,
    slices of 64) keep the per-slice reads."""
    from sageinfer.ops.weight_only import pack, slice_width_for
    gen = torch.Generator().manual_seed(29 + rows + zeros)
    n, s = 24, slice_width_for(k, g)
    assert (g == s or g % (8 * s) == 0) == ((k, g) != (512, 128))
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = ((torch.rand(n, k // g, generator=gen) + 0.1) / 8).half()
    zero = torch.randint(-3, 4, (n, k // g), generator=gen, dtype=torch.int32) if zeros else None
    packed = pack(q, s)
    x = torch.randn(rows, k, generator=gen).half()
    norm_w = (torch.rand(k, generator=gen) + 0.5).half()
    residual = torch.randn(rows, n, generator=gen).half()
    outs = []
    for run_scales in (False, True):
        cfg = {"block_n": 8, "num_warps": 4, "num_stages": 1, "min_programs": 0, "quad_sums": True,
               "run_scales": run_scales}
        kwargs = ({"norm_weight": norm_w.to(DEVICE), "eps": 1e-6} if mode == "normed" else
                  {"residual": residual.clone().to(DEVICE)} if mode == "residual" else
                  {"activate": True} if mode == "activate" else {})
        outs.append(gemv(x.to(DEVICE), packed.to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE),
                         weight_zero=zero.to(DEVICE) if zeros else None, int4=True, slice_width=s, **kwargs).cpu())
    assert torch.equal(outs[0], outs[1])
    inp = _mode_input(x, k, "normed" if mode == "normed" else "plain", norm_w)
    ref = _4bit_reference(inp, packed, scale, zero, g, s, mode, residual)
    assert rel_err(outs[1].float(), ref) < 4e-3


def _ptx_or_skip(path: str) -> bool:
    from sageinfer.platforms.cuda_device import ptx_arch
    if path == "ptx" and ptx_arch() < 80:
        pytest.skip("inline PTX runs on NVIDIA GPUs from sm_80 only")
    return path == "ptx"


@pytest.mark.parametrize("path, ahead", [("triton", 1), ("ptx", 1), ("ptx", 2), ("fp32", 2), ("triton", 2)])
@pytest.mark.parametrize("mode", ["plain", "normed", "residual", "activate"])
@pytest.mark.parametrize("zeros, rows, k, g, dtype", [(False, 1, 256, 16, torch.float16),
                                                      (True, 1, 256, 16, torch.bfloat16),
                                                      (True, 2, 512, 512, torch.float16),
                                                      (False, 1, 512, 128, torch.bfloat16),
                                                      (True, 3, 768, 96, torch.float16)])
def test_4bit_half_sums_match_the_dequantized_weights(path, ahead, mode, zeros, rows, k, g, dtype):
    """half_sums: nibbles as fp16 1024 + n, a thread's four columns summed in fp16 before the group's
    scale, on every kind of group the quad-sum loop reads (one slice, a whole number of runs, several
    slices, not a power of two), with zero points, the folded norm, the residual add and the activation
    out; in Triton (any backend, here the interpreter where there is no GPU) and in NVIDIA's packed
    fp16x2 instructions, with one or two runs of words in flight (also the fp32 quad-sum loop with
    two). Within fp16's rounding of the dequantized reference."""
    from sageinfer.ops.weight_only import pack, slice_width_for
    ptx = _ptx_or_skip(path)
    if DEVICE == "cpu" and dtype == torch.bfloat16 and mode != "plain":
        pytest.skip("the interpreter adds bf16 tensors loaded from memory wrongly (the fp32 kernels too)")
    gen = torch.Generator().manual_seed(31 + rows + zeros + k)
    n, s = 24, slice_width_for(k, g)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = ((torch.rand(n, k // g, generator=gen) + 0.1) / 8).to(dtype)
    zero = torch.randint(-3, 4, (n, k // g), generator=gen, dtype=torch.int32) if zeros else None
    packed = pack(q, s)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    residual = torch.randn(rows, n, generator=gen).to(dtype)
    cfg = {"block_n": 8, "num_warps": 4, "num_stages": 1, "min_programs": 0, "quad_sums": True,
           "run_scales": True, "half_sums": path != "fp32", "ptx": ptx, "ahead": ahead}
    kwargs = ({"norm_weight": norm_w.to(DEVICE), "eps": 1e-6} if mode == "normed" else
              {"residual": residual.clone().to(DEVICE)} if mode == "residual" else
              {"activate": True} if mode == "activate" else {})
    out = gemv(x.to(DEVICE), packed.to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE),
               weight_zero=zero.to(DEVICE) if zeros else None, int4=True, slice_width=s, **kwargs).cpu()
    inp = x.float()
    if mode == "normed":
        inp = ((inp * torch.rsqrt(inp.pow(2).mean(1, keepdim=True) + 1e-6)).to(dtype) * norm_w).float()
    ref = _4bit_reference(inp, packed, scale, zero, g, s, mode, residual)
    assert rel_err(out.float(), ref) < (4e-3 if dtype == torch.float16 else 1.5e-2)


def test_4bit_half_sums_leave_fp32_inputs_to_the_fp32_loop():
    """A float32 model asks for more than fp16's precision: its inputs take the fp32 loop even where the
    fp16-pair loop is asked for, with the same output to the bit."""
    from sageinfer.ops.weight_only import pack
    gen = torch.Generator().manual_seed(41)
    q = torch.randint(0, 16, (16, 256), generator=gen)
    scale = (torch.rand(16, 2, generator=gen) + 0.1) / 8
    x = torch.randn(1, 256, generator=gen)
    outs = [gemv(x.to(DEVICE), pack(q, 32).to(DEVICE), weight_scale=scale.to(DEVICE), int4=True, slice_width=32,
                 config={"block_n": 8, "num_warps": 4, "num_stages": 1, "min_programs": 0, "quad_sums": True,
                         "run_scales": True, "half_sums": half, "ptx": False}).cpu() for half in (False, True)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("path", ["triton", "ptx"])
@pytest.mark.parametrize("size", [3e4, 1e-6])
def test_4bit_half_sums_keep_large_and_small_inputs(path, size):
    """Inputs far outside fp16's comfortable range (30,000: four products would overflow it; 1e-6:
    below its normal range once multiplied by small nibbles) are brought to it by a power of two per
    row before the fp16 sums, and the output keeps the reference's relative accuracy. In the second
    row one input 200 times the others sets that power of two while its weights are zero: the
    ordinary inputs alone make the output and are not lost to fp16's range."""
    from sageinfer.ops.weight_only import dequantize, pack, slice_width_for
    ptx = _ptx_or_skip(path)
    gen = torch.Generator().manual_seed(37)
    n, k, g = 16, 512, 128
    s = slice_width_for(k, g)
    q = torch.randint(0, 16, (n, k), generator=gen)
    q[:, 5] = 8  # stored plus 8: weight 0
    scale = ((torch.rand(n, k // g, generator=gen) + 0.1) / 8).to(torch.bfloat16)
    x = (torch.randn(2, k, generator=gen) * size).to(torch.bfloat16)
    x[1, 5] = size * 200
    cfg = {"block_n": 8, "num_warps": 4, "num_stages": 1, "min_programs": 0, "quad_sums": True,
           "run_scales": True, "half_sums": True, "ptx": ptx}
    out = gemv(x.to(DEVICE), pack(q, s).to(DEVICE), config=cfg, weight_scale=scale.to(DEVICE), int4=True,
               slice_width=s).cpu()
    weight = dequantize(pack(q, s), scale.float(), torch.zeros_like(scale, dtype=torch.int32), g, torch.float64, s)
    ref = x.double() @ weight.t()
    assert torch.isfinite(out).all()
    assert rel_err(out[0].float(), ref[0]) < 1.5e-2 and rel_err(out[1].float(), ref[1]) < 1.5e-2


@pytest.mark.parametrize("rows", [5, 20, 70])
def test_4bit_tensor_core_matmul_takes_any_number_of_rows(rows):
    """Beyond the skinny kernel's rows: tiles of 16 or 32 rows of x over the packed words, equal to the
    dequantized fp16 weights' product (rows past a tile's end masked)."""
    from sageinfer.ops.gemv_int4 import w4a16_mma_matmul
    from sageinfer.ops.weight_only import dequantize, pack
    gen = torch.Generator().manual_seed(rows)
    n, k, g, s = 40, 256, 64, 32
    packed = pack(torch.randint(0, 16, (n, k), generator=gen), s)
    scale = ((torch.rand(n, k // g, generator=gen) + 0.1) / 8).half()
    zero = torch.randint(-3, 4, (n, k // g), generator=gen, dtype=torch.int32)
    x = torch.randn(rows, k, generator=gen).half()
    out = w4a16_mma_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), g, s)
    weight = dequantize(packed, scale, zero, g, torch.float16, s)  # rounded as the kernel rounds it
    ref = x.double() @ weight.double().t()
    assert out.shape == (rows, n) and rel_err(out.float().cpu(), ref) < 2e-3
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_mma_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), g, 8)


@pytest.mark.parametrize("split_k, num_sms", [(2, None), (3, None), (0, 64), (9, None)])
def test_4bit_tensor_core_matmul_split_over_input_features(split_k, num_sms):
    """Programs over parts of K too (0: as many as fill twice the compute units; more parts than runs
    of 8 slices clip to the runs), the last part of a tile adding the others' fp32 sums: the
    dequantized weights' product, the same at a second launch."""
    from sageinfer.ops.gemv_int4 import w4a16_mma_matmul
    from sageinfer.ops.weight_only import dequantize, pack
    gen = torch.Generator().manual_seed(split_k)
    n, k, g, s = 40, 1024, 64, 32  # four runs of 8 slices of 32 columns
    packed = pack(torch.randint(0, 16, (n, k), generator=gen), s)
    scale = ((torch.rand(n, k // g, generator=gen) + 0.1) / 8).half()
    zero = torch.randint(-3, 4, (n, k // g), generator=gen, dtype=torch.int32)
    x = torch.randn(6, k, generator=gen).half()
    out = w4a16_mma_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), g, s,
                           num_sms=num_sms, split_k=split_k)
    ref = x.double() @ dequantize(packed, scale, zero, g, torch.float16, s).double().t()
    assert out.shape == (6, n) and out.dtype == torch.float16 and rel_err(out.float().cpu(), ref) < 2e-3
    from sageinfer.ops.split_k import _COUNTERS
    assert all(not c.any() for c in _COUNTERS.values())  # left at zero for the next launch
    assert torch.equal(out, w4a16_mma_matmul(x.to(DEVICE), packed.to(DEVICE), scale.to(DEVICE), zero.to(DEVICE), g,
                                             s, num_sms=num_sms, split_k=split_k))


@pytest.mark.parametrize("weights", ["fp16", "int8", "fp8", "int4", "int4 per weight", "int4 split"])
@pytest.mark.parametrize("normed", [False, True])
def test_gemv_hands_out_silu_of_gate_times_up(weights, normed):
    """activate=True: the [gate, up] projection returns silu(gate) * up, each program holding gate rows
    beside their up rows, equal to the projection followed by SiLU-and-mul (what the down projection's
    gated input forms now); with the folded norm too, for every weight kind, the 4-bit one also split."""
    from sageinfer.ops.activation import silu_and_mul
    from sageinfer.ops.weight_only import pack
    gen = torch.Generator().manual_seed(7 + normed)
    half, k = 22, 640  # 22 outputs, 4 a program: the last program's pairs past them are masked
    x = torch.randn(1, k, generator=gen).half().to(DEVICE)
    kwargs = {"norm_weight": (torch.rand(k, generator=gen) + 0.5).half().to(DEVICE), "eps": 1e-6} if normed else {}
    if weights.startswith("int4"):
        q = torch.randint(0, 16, (2 * half, k), generator=gen)
        scale = ((torch.rand(2 * half, k // 64, generator=gen) + 0.1) / 8).half()
        kwargs.update(weight=pack(q, 16).to(DEVICE), weight_scale=scale.to(DEVICE), int4=True, slice_width=16,
                      config={"block_n": 8, "num_warps": 4, "num_stages": 1, "min_programs": 12 if "split" in weights
                              else 0, "quad_sums": weights == "int4"})
    elif weights in ("int8", "fp8"):
        w = torch.randn(2 * half, k, generator=gen)
        scale = w.abs().amax(1) / (127.0 if weights == "int8" else 448.0)
        q = (w / scale[:, None]).round().to(torch.int8) if weights == "int8" else (w / scale[:, None]).to(torch.float8_e4m3fn)
        kwargs.update(weight=q.to(DEVICE), weight_scale=scale.to(DEVICE),
                      config={"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 2})
    else:
        kwargs.update(weight=(torch.randn(2 * half, k, generator=gen) / 8).half().to(DEVICE),
                      config={"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 2})
    gate_up = gemv(x, **kwargs)
    out = gemv(x, activate=True, **kwargs)
    assert out.shape == (1, half) and out.dtype == x.dtype
    assert torch.equal(out.cpu(), silu_and_mul(gate_up).cpu())
    with pytest.raises(ValueError, match="activate"):
        gemv(x, activate=True, residual=torch.zeros(1, 2 * half, dtype=x.dtype, device=DEVICE), **kwargs)
