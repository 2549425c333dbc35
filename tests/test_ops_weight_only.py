"""The weight-only kernels (4-bit expansion, block-FP8 matmul) against their torch references."""
import pytest
import torch

from kernels_util import DEVICE, TOL, rel_err
from sageinfer.ops.weight_only import dequantize, pack, unpack


@pytest.mark.parametrize("slice_width", [1, 2, 8])
def test_pack_and_unpack_are_inverse(slice_width):
    q = torch.randint(0, 16, (5, 128), dtype=torch.int32)
    assert torch.equal(unpack(pack(q, slice_width), slice_width), q)


def test_interleaved_words_hold_a_column_of_each_slice():
    """In each run of 8 S columns, nibble j of word w is column j S + w."""
    s, k = 4, 64
    q = (torch.arange(k) % 16).repeat(3, 1)
    words = pack(q, s)
    for run in range(k // (8 * s)):
        for w in range(s):
            for j in range(8):
                assert (words[0, run * s + w].item() >> (4 * j)) & 0xF == q[0, run * 8 * s + j * s + w]


def test_slice_width_divides_the_group_and_tiles_the_input():
    from sageinfer.ops.weight_only import slice_width_for
    assert slice_width_for(4096, 128) == 128 and slice_width_for(12288, 12288) == 128
    assert slice_width_for(640, 64) == 16 and slice_width_for(4096, 32) == 32 and slice_width_for(200, 40) == 1


def test_packed_shapes_that_do_not_fit_are_refused():
    from sageinfer.ops.weight_only import dequantize_kernel
    packed = torch.zeros(8, 32, dtype=torch.int32, device=DEVICE)  # 256 input features
    with pytest.raises(ValueError, match="do not fit"):  # scales for another number of groups
        dequantize_kernel(packed, torch.ones(8, 3, device=DEVICE), torch.zeros(8, 3, dtype=torch.int32, device=DEVICE),
                          64, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):  # runs of 8 x 64 columns do not tile 256
        dequantize_kernel(packed, torch.ones(8, 2, device=DEVICE), torch.zeros(8, 2, dtype=torch.int32, device=DEVICE),
                          128, torch.float32, slice_width=64)


def _8bit_weight(kind: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "int8":
        return torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return (torch.randn(n, k, generator=gen) * 50).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("min_programs", [0, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k, block", [(1, 64, 128, 32), (20, 96, 64, 64), (3, 40, 96, 32)])
def test_8bit_weight_matmul_matches_the_dequantized_weights(m, n, k, block, dtype, min_programs, kind):
    """FP8 blocks (each row carrying its tiles' scales) and INT8 groups: 16-bit inputs take the fp16
    dot on the raw 8-bit values (bf16 ones scaled by 2^-8: here past fp16's range too); min_programs 8
    splits K in 2-3 parts (ops/split_k.py)."""
    from sageinfer.ops.weight_only import dequantize_8bit_groups, w8a16_block_matmul
    gen = torch.Generator().manual_seed(m * n + k)
    weight = _8bit_weight(kind, n, k, gen).to(DEVICE)
    tiles = torch.rand((n + block - 1) // block, (k + block - 1) // block, generator=gen) * 0.01
    scale = tiles.repeat_interleave(block, 0)[:n].to(DEVICE)  # each row carries its tiles' scales
    x = torch.randn(m, k, generator=gen)
    if dtype == torch.bfloat16:
        x[0, :3] = torch.tensor([9e4, -1e-4, 2e-6])
    x = x.to(dtype).to(DEVICE)
    y = w8a16_block_matmul(x, weight, scale, block, block_k=32, min_programs=min_programs)
    ref = x.double() @ dequantize_8bit_groups(weight, scale, block, torch.float64).t()
    assert y.dtype == dtype and rel_err(y, ref) < (1e-5 if dtype == torch.float32 else TOL[dtype])


def _same_weight(got, ref):
    """Equal in fp32; in bf16 equal on the GPU, within one bf16 step in the interpreter (its fp32 -> bf16
    cast truncates where torch rounds to nearest)."""
    if got.dtype == torch.bfloat16 and DEVICE == "cpu":
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("n, k, group, asymmetric, slice_width", [
    (40, 256, 64, False, 1), (96, 384, 128, True, 16), (24, 96, 96, True, 4), (20, 512, 128, True, 32)])
def test_one_pass_dequantization_is_the_reference(n, k, group, asymmetric, slice_width):
    """What batches above the kernels' rows multiply with the library GEMM: the 4-bit weight expanded in
    one Triton pass (a run of slices per program, or a word per column for narrow slices), equal to
    the torch reference."""
    from sageinfer.ops.weight_only import dequantize_kernel
    gen = torch.Generator().manual_seed(n + k)
    packed = pack(torch.randint(0, 16, (n, k), generator=gen), slice_width)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    zeros = (torch.randint(-3, 4, (n, k // group), generator=gen) if asymmetric
             else torch.zeros(n, k // group, dtype=torch.int64)).to(torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_kernel(packed.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), group, dtype, slice_width)
        assert got.dtype == dtype
        _same_weight(got.cpu(), dequantize(packed, scales, zeros, group, dtype, slice_width))


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("n, k, block", [(64, 128, 32), (100, 200, 64)])
def test_one_pass_8bit_dequantization_is_the_reference(n, k, block, kind):
    from sageinfer.ops.weight_only import dequantize_8bit_groups, dequantize_8bit_groups_kernel
    gen = torch.Generator().manual_seed(n * k)
    weight = _8bit_weight(kind, n, k, gen)
    scale = torch.rand(n, (k + block - 1) // block, generator=gen) * 0.01
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_8bit_groups_kernel(weight.to(DEVICE), scale.to(DEVICE), block, dtype)
        _same_weight(got.cpu(), dequantize_8bit_groups(weight, scale, block, dtype))
