"""FP4 e2m1 weights from compressed-tensors, packed two a byte along the input (`weight_packed` uint8
[out, in / 2], the first in the low nibble):
- NVFP4 (nvfp4-pack-quantized: llm-compressor's NVFP4A16 and NVFP4): an FP8 e4m3 scale per 16 inputs
  (`weight_scale` [out, in / 16]) and one float32 `weight_global_scale` a tensor (each part of a
  merged q/k/v or gate/up its own): w = e2m1 * scale / global_scale;
- MXFP4 (mxfp4-pack-quantized: MXFP4A16 and MXFP4): a power of two per 32 inputs, its biased
  exponent in a byte (`weight_scale` uint8, E8M0): w = e2m1 * 2^(scale - 127).
ModelOpt's NVFP4 exports hold the same codes and group scales as `weight` and `weight_scale`, with the
reciprocal of the global scale as `weight_scale_2` (w = e2m1 * scale * scale_2) and `input_scale`.

The weights stay at four bits (ops/fp4_weights.py's layout: `weight` int32 [out, in / 8]), with the
checkpoint's scale bytes (`weight_scale` uint8 [out, groups], in the layout's order) and a float32 scale per output row
(`weight_row_scale`: NVFP4's 1 / global scale, MXFP4's 1). One row runs the 4-bit one-row kernel's
fp16-pair loop (ops/gemv_int4.py, with its norm, activation and residual folds), 2 to 32 rows its
tensor-core kernel, more rows the weights expanded in one pass for the library GEMM, as W4A16 layers do.
The FP4 activations of NVFP4 and MXFP4 (W4A4) are not quantized: no chip this engine runs on multiplies
FP4, so the layer runs its weights with 16-bit activations, as vLLM does on GPUs without FP4 matmuls.
"""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.layers.quantization.checkpoint_params import checkpoint_param
from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.layers.quantization.w4a16 import MMA_MAX_ROWS
from sageinfer.layers.quantization.w8a8 import per_row_scale_loader
from sageinfer.ops.fp4_weights import fp4_dequantize, fp4_dequantize_kernel, fp4_pack, scales_run_major
from sageinfer.ops.gemv import gemv
from sageinfer.ops.gemv_int4 import w4a16_mma_matmul
from sageinfer.ops.weight_only import slice_width_for

_E2M1_MAX = 6.0
_FP8_MAX = 448.0
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def fp4_slice_width(k: int) -> int:
    """The widest slice (a power of two from 4 to 128) whose runs of 8 S columns tile k; 0 if none
    (the slices need not lie in one group: the FP4 kernels read a scale per four columns)."""
    s = slice_width_for(k, 128)
    return s if s >= 4 else 0


def checkpoint_codes(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 2] uint8, two e2m1 codes a byte (the first in the low nibble) -> [rows, cols] codes."""
    return torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1).to(torch.int32)


def _scale_bytes(scale: torch.Tensor) -> torch.Tensor:
    """A checkpoint's group scales as bytes: NVFP4's FP8 e4m3 viewed as uint8, MXFP4's E8M0 as they are."""
    return scale.view(torch.uint8) if scale.dtype == torch.float8_e4m3fn else scale


class Fp4Method:
    # The one-row loop takes a plain input: the MLP activates in its gate_up matmul (layers/linear.py).
    plain_one_row_input = True

    def __init__(self, config: QuantConfig):
        self.config = config
        self.mx = config.format == "mxfp4"
        self.kind = "e8m0" if self.mx else "e4m3"
        self.num_sms = None  # the platform's compute units, once prepare() has run
        # the checkpoint's names of the codes, the global scale and the activations' scale
        self.names = ({"codes": "weight", "global": "weight_scale_2", "input": "input_scale"}
                      if config.tensor_names == "modelopt" else
                      {"codes": "weight_packed", "global": "weight_global_scale", "input": "input_global_scale"})

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        self.group = self.config.group_size  # (16 for NVFP4, 32 for MXFP4: config.py)
        self.slice_width = fp4_slice_width(local_in)
        if local_in % self.group or not self.slice_width:
            raise ValueError(f"FP4 weights: {local_in} input features per rank do not hold whole groups of "
                             f"{self.group} in runs of 32 columns")
        self.dtype = torch.get_default_dtype()  # the model's activations
        if not self.config.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            return layer.new_weight()
        names = self.names
        checkpoint_param(layer, names["codes"], torch.empty(local_out, local_in // 2, dtype=torch.uint8), lambda t: t)
        checkpoint_param(layer, "weight_scale", torch.empty(local_out, local_in // self.group, dtype=torch.uint8),
                         _scale_bytes)
        if not self.mx:  # one a tensor (each part of a merged layer its own)
            setattr(layer, names["global"], nn.Parameter(torch.zeros(local_out), requires_grad=False))
            getattr(layer, names["global"]).weight_loader = per_row_scale_loader(layer)
        checkpoint_param(layer, names["input"], torch.zeros(1), None)  # FP4 activations: unused

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.config.from_checkpoint:
            return self._quantize(layer)
        scale, names = layer.weight_scale.data, self.names
        if self.mx:
            if bool((scale == 255).any()):
                raise ValueError("an MXFP4 layer's weight_scale holds 255 (E8M0's NaN)")
            row_scale = torch.ones(scale.shape[0], device=scale.device)
        else:
            global_scale = getattr(layer, names["global"]).data.float()
            if not bool((global_scale > 0).all()):
                raise ValueError(f"an NVFP4 layer's {names['global']} is missing or not positive")
            row_scale = global_scale if names["global"] == "weight_scale_2" else 1.0 / global_scale
        words = fp4_pack(checkpoint_codes(getattr(layer, names["codes"]).data), self.slice_width)
        for name in names.values():
            if hasattr(layer, name):
                delattr(layer, name)
        self._hold(layer, words, scale, row_scale)

    def _hold(self, layer: nn.Module, words: torch.Tensor, scale: torch.Tensor, row_scale: torch.Tensor) -> None:
        layer.weight = nn.Parameter(words, requires_grad=False)
        layer.weight_scale = nn.Parameter(scales_run_major(scale, self.group, self.slice_width), requires_grad=False)
        layer.register_buffer("weight_row_scale", row_scale.float())

    def _quantize(self, layer: nn.Module) -> None:
        """FP4 of the layer's full-precision weight as llm-compressor makes it (dummy weights for
        benchmarks), values rounded to the nearest e2m1 (saturating at 6): NVFP4 with a global scale
        putting the largest group scale at FP8's top and FP8 group scales; MXFP4 with each group's scale
        a power of two."""
        w = layer.weight.data.float()
        grouped = w.view(w.shape[0], -1, self.group)
        amax = grouped.abs().amax(-1).clamp(min=1e-30)
        if self.mx:
            exponent = (torch.floor(torch.log2(amax)) - 2 + 127).clamp(1, 254)  # (OCP MX: e2m1's top exponent is 2)
            scale = exponent.to(torch.uint8)
            values = torch.ldexp(torch.ones_like(amax), exponent.to(torch.int32) - 127)
            row_scale = torch.ones(w.shape[0], device=w.device)
        else:
            global_scale = _FP8_MAX * _E2M1_MAX / w.abs().amax().clamp(min=1e-12)
            fp8 = (amax / _E2M1_MAX * global_scale).clamp(min=2 ** -9, max=_FP8_MAX).to(torch.float8_e4m3fn)
            scale = fp8.view(torch.uint8)
            values = fp8.float() / global_scale
            row_scale = torch.full((w.shape[0],), 1.0 / global_scale.item(), device=w.device)
        x = grouped / values.unsqueeze(-1)
        bounds = torch.tensor(_E2M1_MIDPOINTS, device=w.device)
        codes = torch.bucketize(x.abs(), bounds).to(torch.int32) | torch.where(x < 0, 8, 0).to(torch.int32)
        del layer.weight
        self._hold(layer, fp4_pack(codes.view(w.shape), self.slice_width), scale.contiguous(), row_scale)

    def prepare(self, layer: nn.Module) -> None:
        """Before serving: the platform's compute units, which the tensor-core matmul's tiles follow."""
        self.num_sms = layer.platform.num_compute_units()

    def kernel_rows(self, layer: nn.Module) -> int:
        """The most rows on this method's own Triton kernels (what a start-up compiles ahead)."""
        return MMA_MAX_ROWS if self.slice_width >= 16 else 0

    def one_row_args(self, layer: nn.Module) -> dict | None:
        """The one-row kernel's fp16-pair loop (sums in fp16: not for float32 models)."""
        return None if self.dtype == torch.float32 else self._gemv_args(layer)

    def _gemv_args(self, layer: nn.Module) -> dict:
        return {"weight": layer.weight, "weight_scale": layer.weight_scale, "row_scale": layer.weight_row_scale,
                "int4": True, "fp4": self.kind, "slice_width": self.slice_width}

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        weights = (layer.weight, layer.weight_scale, layer.weight_row_scale)
        if layer.use_triton and rows == 1 and x.dtype != torch.float32:
            y = gemv(x2.contiguous(), **self._gemv_args(layer))
        elif layer.use_triton and rows <= MMA_MAX_ROWS and self.slice_width >= 16:
            y = w4a16_mma_matmul(x2, layer.weight, layer.weight_scale, None, self.group, self.slice_width,
                                 num_sms=self.num_sms, fp4=self.kind, row_scale=layer.weight_row_scale)
        else:  # the weight expanded (in one pass where kernels run) for the library GEMM
            expand = fp4_dequantize_kernel if layer.use_triton else fp4_dequantize
            y = nn.functional.linear(x2, expand(*weights, self.group, self.mx, x.dtype, self.slice_width))
        return y.reshape(*shape[:-1], y.shape[-1])
