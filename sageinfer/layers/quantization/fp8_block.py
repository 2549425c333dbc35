"""Block-quantized FP8 checkpoints (`quant_method: "fp8"` with `weight_block_size`, as the official
FP8 releases of Qwen3 and DeepSeek hold them): FP8 e4m3 `weight` [out, in] and `weight_scale_inv`
[out / b, in / b], the multiplier of each b x b tile; compressed-tensors' FP8 blocks (llm-compressor's
FP8_BLOCK) hold the same tensors, the scales named `weight_scale`.

Kept as FP8 (one byte a weight) with each tile's scale spread over its rows, so tensor-parallel
splits and merged q/k/v or gate/up parts cut the scales exactly as the weight. One row (decode of one
sequence) takes the skinny GEMV with the tiles' scales and the 16-bit layers' fusions; small batches
a Triton kernel that scales the FP8 tiles in registers (half the bytes of bf16 per decode step).
Larger ones go to the chip's block-scaled FP8 GEMM where the platform has one (activations quantized
per token and 128 columns, as these checkpoints were made for); elsewhere, and for ModelOpt's weight-only
tiles (FP8_PB_WO: activations stay 16-bit), the layer is expanded to the activations' dtype for the
library GEMM.
"""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.layers.quantization.w8a16 import split_k_programs
from sageinfer.layers.quantization.w8a8 import quantize_rows
from sageinfer.ops.quantize import quantize_rows_kernel
from sageinfer.ops.weight_only import W8A16_MAX_ROWS, dequantize_8bit_groups, dequantize_8bit_groups_kernel

class Fp8BlockMethod:
    def __init__(self, config: QuantConfig):
        self.config = config
        self.block = config.group_size
        self.min_programs = 0  # split K up to this many programs (prepare sets it for the platform)

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        b = self.block
        if local_in % b:
            raise ValueError(f"block FP8: {local_in} input features per rank do not hold whole {b}-wide blocks")
        layer.weight_scale_block = None  # one scale per tile, for the platform's block GEMM (prepare)
        # FP8 from the checkpoint, or full-precision (dummy) weights quantized after loading
        layer.new_weight(torch.float8_e4m3fn if self.config.from_checkpoint else None)
        if not self.config.from_checkpoint:
            return
        scales = nn.Parameter(torch.empty(local_out, local_in // b, dtype=torch.float32), requires_grad=False)
        setattr(layer, self.scale_name, scales)

        def load_scales(param, loaded, shard_id=None):
            # each tile's scale on each of its rows; the last tile of a projection whose rows are not
            # whole blocks (k and v of small models) covers only the rows there are. (ModelOpt's tiles
            # come as [out / b, 1, in / b, 1], one tile's as a scalar.)
            tiles = loaded.float().reshape(loaded.shape[0] if loaded.dim() else 1, -1)
            rows = tiles.repeat_interleave(b, 0)[:layer.whole_rows(shard_id)]
            layer.weight_loader(param, rows.contiguous(), shard_id)
        scales.weight_loader = load_scales

    @property
    def scale_name(self) -> str:
        """The tiles' scales as the checkpoint names them; the layer holds them as weight_scale_inv."""
        return "weight_scale" if self.config.format == "compressed-tensors" else "weight_scale_inv"

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.config.from_checkpoint:
            if self.scale_name != "weight_scale_inv":
                layer.weight_scale_inv = getattr(layer, self.scale_name)
                delattr(layer, self.scale_name)
            return
        b = self.block
        dtype_weight = layer.weight.data.float()
        n, k = dtype_weight.shape
        tiles = nn.functional.pad(dtype_weight, (0, 0, 0, (-n) % b)).view(-1, b, k // b, b)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0          # [n / b, k / b]
        rows = scale.repeat_interleave(b, 0)[:n]
        q = (dtype_weight / rows.repeat_interleave(b, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(rows.contiguous(), requires_grad=False)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight the FP8 tiles and their scales encode, in float32."""
        return dequantize_8bit_groups(layer.weight, layer.weight_scale_inv, self.block, torch.float32)

    def prepare(self, layer: nn.Module) -> None:
        """Before serving (outside graphs): the tiles' scales one per tile, for the platform's
        block-scaled GEMM where it has one for 128 x 128 tiles and the activations may be quantized."""
        platform = layer.platform
        self.min_programs = split_k_programs(layer)
        if self.config.activation_dynamic and self.block == 128 and layer.weight.shape[0] % 128 == 0 \
                and platform is not None and platform.supports_fp8_block_gemm():  # (weight-only tiles: never)
            layer.weight_scale_block = layer.weight_scale_inv[::128].contiguous()

    def kernel_rows(self, layer: nn.Module) -> int:
        """The most rows on this method's own Triton kernels (what a start-up compiles ahead)."""
        return W8A16_MAX_ROWS

    def one_row_args(self, layer: nn.Module) -> dict:
        """One row goes through the skinny kernel with each tile's scale applied to the weight chunks
        in registers (ops/gemv.py), with the norm and residual fusions of 16-bit layers."""
        return {"weight": layer.weight, "weight_scale": layer.weight_scale_inv}

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = None
        if layer.use_triton and x2.shape[0] <= W8A16_MAX_ROWS:  # the platform runs Triton kernels
            from sageinfer.ops.weight_only import w8a16_block_matmul
            y = w8a16_block_matmul(x2, layer.weight, layer.weight_scale_inv, self.block,
                                   min_programs=self.min_programs)
        elif layer.weight_scale_block is not None:
            xq, x_scale = quantize_groups(x2, 128, layer.use_triton)
            y = layer.platform.fp8_block_matmul(xq, x_scale, layer.weight, layer.weight_scale_block, x.dtype)
        if y is None:  # the weight expanded (in one pass where kernels run) for the library GEMM
            expand = dequantize_8bit_groups_kernel if layer.use_triton else dequantize_8bit_groups
            y = nn.functional.linear(x2, expand(layer.weight, layer.weight_scale_inv, self.block, x.dtype))
        return y.reshape(*shape[:-1], y.shape[-1])


def quantize_groups(x: torch.Tensor, group: int, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] to FP8 e4m3 per token and `group` columns: (xq [M, K], scales [M, K / group]), each
    group a row of W8A8's per-row quantization (its one-launch kernel where the platform runs Triton)."""
    m, k = x.shape
    rows = x.reshape(m * k // group, group)
    xq, scale = quantize_rows_kernel(rows.contiguous(), "fp8", 448.0) if kernel else quantize_rows(rows, "fp8")
    return xq.view(m, k), scale.view(m, k // group)
