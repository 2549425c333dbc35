"""The portable INT8 matmul (int32 accumulation, per-row x per-channel scales) against torch."""
import pytest
import torch

from kernels_util import DEVICE, rel_err
from sageinfer.layers.quantization.w8a8 import dequantized_matmul
from sageinfer.ops.int8_matmul import FAST_CONFIGS, INT8_TMA, MANY_ROWS, fast_config, int8_matmul


@pytest.mark.parametrize("m, n, k", [(1, 40, 96), (70, 130, 200), (5, 64, 64)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_matches_the_exact_product(m, n, k, out_dtype):
    gen = torch.Generator().manual_seed(m * n + k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x_scale = torch.rand(m, 1, generator=gen) * 0.01 + 1e-3
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    y = int8_matmul(xq.to(DEVICE), x_scale.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), out_dtype)
    exact = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double().view(1, -1)
    assert y.dtype == out_dtype and y.shape == (m, n)
    assert rel_err(y.cpu(), exact) < (1e-6 if out_dtype == torch.float32 else 1e-2)
    assert rel_err(y.cpu().float(), dequantized_matmul(xq, x_scale, wq, w_scale, torch.float32)) < 1e-2


def _exact_case(m, n, k):
    gen = torch.Generator().manual_seed(m + n * k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x_scale = torch.rand(m, 1, generator=gen) * 0.01 + 1e-3
    w_scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    return xq, x_scale, wq, w_scale, (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double().view(1, -1)


@pytest.mark.parametrize("m, n, k", [(200, 100, 96), (200, 100, 100), (129, 64, 64)])
def test_row_tiles_taken_in_groups_cover_every_tile_once(m, n, k):
    """Small tiles over many row tiles: more than one group of GROUP_M row tiles (the last one short),
    partial row, column and K tiles; every output element is the exact product's."""
    xq, x_scale, wq, w_scale, exact = _exact_case(m, n, k)
    cfg = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4}
    y = int8_matmul(xq.to(DEVICE), x_scale.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), torch.float32, cfg)
    assert rel_err(y.cpu(), exact) < 1e-6
    assert (y.cpu() - exact).abs().max() < 1e-5 * exact.abs().max()


@pytest.mark.parametrize("m, n, k", [(200, 96, 96), (129, 64, 208), (3, 304, 256)])
@pytest.mark.parametrize("programs", [1, 3, 40])
def test_the_persistent_descriptor_kernel_covers_every_tile_once(m, n, k, programs):
    """The descriptor kernel (one program walking several output tiles, row tiles in groups): partial row,
    column and K tiles (zero-filled by the copies, the output's edge clipped), one program for every tile or
    more programs than tiles; every element the exact product's, in both output types."""
    xq, x_scale, wq, w_scale, exact = _exact_case(m, n, k)
    cfg = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "programs": programs}
    for out_dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        y = int8_matmul(xq.to(DEVICE), x_scale.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), out_dtype, cfg)
        assert y.dtype == out_dtype and rel_err(y.cpu().double(), exact) < tol
        assert (y.cpu().double() - exact).abs().max() < 8 * tol * exact.abs().max()


def test_operands_the_copy_engine_cannot_take_go_to_the_pointer_kernel(monkeypatch):
    """Rows of K = 100 int8 bytes (not a multiple of 16): no descriptor; the pointer kernel gives the product."""
    from sageinfer.ops import int8_matmul as module
    xq, x_scale, wq, w_scale, exact = _exact_case(70, 64, 100)
    assert not module.tma_applies(xq, wq, torch.float32)
    xq_96, _, wq_96, _, _ = _exact_case(70, 64, 96)
    assert module.tma_applies(xq_96, wq_96, torch.float32)
    launched = []
    kernel = module._int8_matmul_kernel

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]
    monkeypatch.setattr(module, "_int8_matmul_kernel", Recorder())
    cfg = {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4, "programs": 2}
    y = int8_matmul(xq.to(DEVICE), x_scale.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), torch.float32, cfg)
    assert launched and rel_err(y.cpu(), exact) < 1e-6


@pytest.mark.parametrize("m", [3, 100])
def test_the_fast_configurations_give_the_exact_product(m):
    """The tiles chosen by row count where the kernel runs for speed, each of them on the same inputs."""
    xq, x_scale, wq, w_scale, exact = _exact_case(m, 300, 256)
    for _, cfg in FAST_CONFIGS:
        y = int8_matmul(xq.to(DEVICE), x_scale.to(DEVICE), wq.to(DEVICE), w_scale.to(DEVICE), torch.bfloat16, cfg)
        assert rel_err(y.cpu(), exact) < 1e-2, cfg


def test_the_fast_configuration_follows_the_row_count():
    assert fast_config(2) is fast_config(64) is FAST_CONFIGS[0][1]
    assert fast_config(65) is fast_config(512) is FAST_CONFIGS[1][1]
    if INT8_TMA:  # the largest batches in the descriptor kernel's tiles
        assert fast_config(513) is fast_config(8192) is FAST_CONFIGS[2][1] is MANY_ROWS
        assert fast_config(8193) is fast_config(16384) is FAST_CONFIGS[3][1]
        assert FAST_CONFIGS[3][1].get("persistent")
    else:
        assert fast_config(513) is fast_config(16384) is FAST_CONFIGS[2][1] is MANY_ROWS


def test_what_it_cannot_take_is_refused():
    with pytest.raises(ValueError, match="int8"):
        int8_matmul(torch.zeros(2, 8, device=DEVICE), torch.ones(2, 1, device=DEVICE),
                    torch.zeros(4, 8, dtype=torch.int8, device=DEVICE), torch.ones(4, device=DEVICE), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        int8_matmul(torch.zeros(8, 2, dtype=torch.int8, device=DEVICE).t(), torch.ones(2, 1, device=DEVICE),
                    torch.zeros(4, 8, dtype=torch.int8, device=DEVICE), torch.ones(4, device=DEVICE), torch.float32)


def test_chips_without_a_library_int8_gemm_take_the_kernel():
    from sageinfer.platforms.base import Platform
    from sageinfer.platforms.cpu import CpuPlatform
    from sageinfer.platforms.cuda import CudaPlatform
    x, w = torch.zeros(3, 60, dtype=torch.int8), torch.zeros(60, 60, dtype=torch.int8)
    assert CpuPlatform().int8_matmul(x, w) is not None  # the library GEMM
    assert CudaPlatform().int8_matmul(x, w) is None and not CudaPlatform.portable_int8_kernel  # the reference
    assert Platform().int8_matmul(x, w) is None and Platform.portable_int8_kernel  # other chips: the kernel
    # The kernel in preference to a library GEMM: Hopper only (measured there), never on the CPU.
    assert not Platform().prefers_int8_kernel() and not CpuPlatform().prefers_int8_kernel()
    if not torch.cuda.is_available():
        assert not CudaPlatform().prefers_int8_kernel()


@pytest.mark.parametrize("copies", [True, False])
def test_a_persistent_configuration_gets_one_program_a_processor_where_the_chip_copies_tiles(monkeypatch, copies):
    """W8A8's INT8 matmul (the tiles past 8,192 rows are persistent unless SAGEINFER_INT8_TMA=0): the layer asks for
    the descriptor kernel with the platform's processor count where the platform has a tensor copy engine, and for
    the pointer kernel's wide tiles where it has none."""
    import types
    from sageinfer.layers.quantization import w8a8
    seen = []
    monkeypatch.setattr(w8a8, "fast_config", lambda m: {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 4,
                                                       "persistent": True})
    monkeypatch.setattr(w8a8, "int8_matmul", lambda *args: seen.append(args[-1]))
    platform = types.SimpleNamespace(prefers_int8_kernel=lambda: True, supports_tensor_copies=lambda: copies,
                                     num_compute_units=lambda: 7)
    xq, x_scale, wq, w_scale, _ = _exact_case(40, 64, 96)
    method = types.SimpleNamespace(scheme="int8")
    w8a8.W8A8Method.prepare(method, types.SimpleNamespace(platform=platform))  # as the runner does before serving
    w8a8.W8A8Method._matmul(method, xq, x_scale, wq, w_scale, torch.float32, platform, use_triton=True)
    assert seen[0].get("programs") == (7 if copies else None)
    assert copies or seen[0] is w8a8.MANY_ROWS
