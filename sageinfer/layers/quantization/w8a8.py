"""8-bit weights and activations (FP8 e4m3 or INT8): weights with a scale per output channel,
activations with a scale per token computed at run time (or one static scale from the checkpoint).

The matmul runs on the 8-bit inputs: `torch._scaled_mm` (FP8, rowwise scales) or for INT8 the Triton
kernel of ops/int8_matmul.py (int32 accumulation, scales in its epilogue: Hopper and chips without a
library INT8 GEMM) or `torch._int_mm` (scales applied after), with a dequantizing fallback for shapes
those refuse. A checkpoint's per-tensor weight scales are spread over their rows at load time, so one
per-channel kernel serves both strategies, and a merged q/k/v or gate/up layer keeps each part's scale.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.ops.int8_matmul import FAST_CONFIGS, MANY_ROWS, fast_config, int8_matmul
from sageinfer.ops.quantize import quantize_rows_kernel
from sageinfer.platforms import get_platform

_QMAX = {"fp8": 448.0, "int8": 127.0}
_QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# INT8 activations span the whole range [-128, 127], as compressed-tensors (llm-compressor) calibrates
# them: absmax maps to 127.5.
_ACT_HALF_RANGE = {"fp8": 448.0, "int8": 127.5}
# SAGEINFER_FUSED_QUANTIZE=0: the norm and activation kernels write 16-bit rows and the layers quantize
# them apart (to compare the two paths).
FUSED_QUANTIZE = os.environ.get("SAGEINFER_FUSED_QUANTIZE", "1") != "0"


def quantize_rows(x: torch.Tensor, scheme: str, activations: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (8-bit x, fp32 scale [M, 1]) with a scale per row (symmetric, absmax)."""
    half_range = _ACT_HALF_RANGE[scheme] if activations else _QMAX[scheme]
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / half_range
    return quantize_with(x, scale, scheme), scale


# Weights quantized at load time go a few rows at a time, so that their float32 temporaries stay near 64 MB a
# chunk. A 70B layer's whole gate_up took three of 1.9 GB each: transients of that size are the likely cause of
# the 9.8 GiB the allocator held unused when a 70B FP8 load ran out of memory on an 80 GB card (2026-12-06).
WEIGHT_CHUNK_ELEMENTS = 1 << 24


def quantize_weight_rows(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows of a weight [N, K], the same values, row chunks of about WEIGHT_CHUNK_ELEMENTS at a time."""
    wq = torch.empty(w.shape, dtype=_QDTYPE[scheme], device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    rows = max(1, WEIGHT_CHUNK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        wq[start:start + rows], scale[start:start + rows] = quantize_rows(w[start:start + rows], scheme)
    return wq, scale


def quantize_with(x: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "int8":
        return (x.float() / scale).round().clamp(-128, 127).to(torch.int8)
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def dequantized_matmul(xq, x_scale, wq, w_scale, out_dtype):
    """The reference: what the 8-bit matmul computes, in fp32."""
    return ((xq.float() * x_scale) @ (wq.float() * w_scale.view(-1, 1)).t()).to(out_dtype)


def per_row_scale_loader(layer: nn.Module):
    """The loader of a scale held per output row: one scale for a tensor (or for this part of a merged
    layer) spread over its rows; a scale per output channel split and stacked like the weight's rows."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = loaded.float()
        if loaded.numel() == 1:
            rows = param.data if shard_id is None else param.data.narrow(0, *layer.shard_offsets[shard_id])
            rows.fill_(loaded.item())
        else:
            layer.weight_loader(param, loaded.reshape(-1), shard_id)
    return load


class W8A8Method:
    def __init__(self, config: QuantConfig):
        self.config = config
        self.scheme = config.scheme

    # ---- tensors ---------------------------------------------------------------------------------
    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        c = self.config
        layer.new_weight(_QDTYPE[self.scheme] if c.from_checkpoint else None)
        if c.from_checkpoint:
            layer.weight_scale = nn.Parameter(torch.zeros(local_out, dtype=torch.float32), requires_grad=False)
            layer.weight_scale.weight_loader = per_row_scale_loader(layer)
            if not c.activation_dynamic:
                layer.input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=False)
                layer.input_scale.weight_loader = _max_loader

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.config.from_checkpoint:  # quantize the full-precision weights now
            wq, scale = quantize_weight_rows(layer.weight.data, self.scheme)
            layer.weight = nn.Parameter(wq, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale.view(-1), requires_grad=False)
        elif not bool((layer.weight_scale > 0).all()):
            raise ValueError("a quantized layer's weight_scale is missing or not positive")

    def prepare(self, layer: nn.Module) -> None:
        """Before serving: the INT8 descriptor kernel's programs, one a processor where the platform copies tiles
        (0: the pointer kernel), asked of the platform once rather than at every matmul of every step."""
        platform = layer.platform
        self.copy_programs = platform.num_compute_units() if platform.supports_tensor_copies() else 0

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight the 8-bit one and its scales encode, in float32."""
        return layer.weight.float() * layer.weight_scale.view(-1, 1)

    # ---- the matmul --------------------------------------------------------------------------------
    def kernel_rows(self, layer: nn.Module) -> int:
        """Where the platform prefers the Triton INT8 kernel: the rows a start-up warms it up at
        (executor/linear_warm_up.py), one past its smallest tiles' limit so that both decode tile kinds
        compile beside the memory profile (the row count is not specialised; the large tiles compile in
        the profile's own pass). Elsewhere 0: the library GEMMs compile nothing."""
        if self.scheme != "int8" or not (layer.platform or get_platform()).prefers_int8_kernel():
            return 0
        return FAST_CONFIGS[0][0] + 1

    def extra_warm_up_rows(self, layer: nn.Module) -> list[int]:
        """Row counts past kernel_rows that start-up warms too: the first of each tile kind between the decode
        kinds and the largest batches' kind, which the memory profile's own pass compiles (with the descriptor
        kernel on, the pointer kernel's wide tiles of 513 to 8,192 rows would otherwise compile while serving).
        Asked only where kernel_rows is not 0 (executor/linear_warm_up.py)."""
        return [FAST_CONFIGS[i - 1][0] + 1 for i in range(2, len(FAST_CONFIGS) - 1)]

    def one_row_args(self, layer: nn.Module) -> dict | None:
        """One row (decode of one sequence) reads the 8-bit weights in the skinny kernel with 16-bit
        activations and the per-row scales (ops/gemv.py): half the bytes of a 16-bit layer, no
        activation quantization pass, and the norm and residual fusions of 16-bit layers."""
        if layer.weight.dtype not in (torch.float8_e4m3fn, torch.int8):
            return None
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}

    def _dynamic(self, layer: nn.Module) -> bool:
        """Whether the activations take a scale per row at run time (no static scale from the checkpoint)."""
        return self.config.activation_dynamic or not hasattr(layer, "input_scale")

    def fused_input(self, layer: nn.Module) -> tuple[str, float] | None:
        """(scheme, half range) where the kernel before this layer may write its input as 8-bit rows with
        their scales (ops/quantize_fused.py): dynamic per-row activations through the platform's kernels."""
        if FUSED_QUANTIZE and layer.use_triton and self._dynamic(layer):
            return self.scheme, _ACT_HALF_RANGE[self.scheme]
        return None

    def input_rows(self, layer: nn.Module, rows: int) -> int:
        """The rows to allocate for this layer's 8-bit input of `rows` rows: more where the platform's FP8
        GEMM is faster on a taller input (platform.fp8_gemm_rows; the extra rows' products are dropped)."""
        if self.scheme != "fp8" or rows == 0:
            return rows
        return (layer.platform or get_platform()).fp8_gemm_rows(rows)

    def apply_quantized(self, layer: nn.Module, xq: torch.Tensor, x_scale: torch.Tensor,
                        out_dtype: torch.dtype, rows: int) -> torch.Tensor:
        """The matmul of rows already quantized as fused_input says: xq [M, K] with x_scale [M, 1], of
        which the first `rows` are the input's (input_rows may have made M larger)."""
        return self._matmul(xq, x_scale, layer.weight, layer.weight_scale, out_dtype,
                            layer.platform or get_platform(), layer.use_triton)[:rows]

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dynamic = self._dynamic(layer)
        if layer.use_triton:  # the platform's kernel choice: one fused quantization launch
            xq, x_scale = quantize_rows_kernel(x2.contiguous(), self.scheme, _ACT_HALF_RANGE[self.scheme],
                                               None if dynamic else layer.input_scale,
                                               rows_out=self.input_rows(layer, x2.shape[0]))
        elif dynamic:
            xq, x_scale = quantize_rows(x2, self.scheme, activations=True)
        else:
            x_scale = layer.input_scale.view(1, 1).expand(x2.shape[0], 1).contiguous()
            xq = quantize_with(x2, x_scale, self.scheme)
        y = self._matmul(xq, x_scale, layer.weight, layer.weight_scale, x.dtype, layer.platform or get_platform(),
                         layer.use_triton)[:x2.shape[0]]
        return y.reshape(*shape[:-1], y.shape[-1])

    def _matmul(self, xq, x_scale, wq, w_scale, out_dtype, platform, use_triton: bool = False):
        """The chip's library 8-bit GEMM (the platform's), else for INT8 the Triton kernel where kernels
        run (ops/int8_matmul.py: Hopper, where it is faster, and the domestic accelerators), else the
        dequantized reference."""
        if self.scheme == "fp8":
            y = platform.fp8_scaled_matmul(xq, wq, x_scale, w_scale, out_dtype)
            return y if y is not None else dequantized_matmul(xq, x_scale, wq, w_scale, out_dtype)
        if use_triton and platform.prefers_int8_kernel():
            cfg = fast_config(xq.shape[0])
            programs = getattr(self, "copy_programs", 0)
            if cfg.get("persistent"):  # without a tile copy engine, the pointer kernel's wide tiles
                cfg = {**cfg, "programs": programs} if programs else MANY_ROWS
            return int8_matmul(xq, x_scale, wq, w_scale, out_dtype, cfg)
        acc = platform.int8_matmul(xq, wq)
        if acc is not None:
            return (acc.float() * x_scale * w_scale.view(1, -1)).to(out_dtype)
        if use_triton and platform.portable_int8_kernel:
            return int8_matmul(xq, x_scale, wq, w_scale, out_dtype)
        return dequantized_matmul(xq, x_scale, wq, w_scale, out_dtype)


def _max_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """A static input scale: merged parts share one input, so the largest of their scales serves all."""
    param.data.fill_(max(float(param.data.item()), float(loaded.float().max())))
