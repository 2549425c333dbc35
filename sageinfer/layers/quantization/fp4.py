"""FP4 e2m1 weights from compressed-tensors, packed two a byte along the input (`weight_packed` uint8
[out, in / 2], the first in the low nibble):
- NVFP4 (nvfp4-pack-quantized: llm-compressor's NVFP4A16 and NVFP4): an FP8 e4m3 scale per 16 inputs
  (`weight_scale` [out, in / 16]) and one float32 `weight_global_scale` a tensor (each part of a
  merged q/k/v or gate/up its own): w = e2m1 * scale / global_scale;
- MXFP4 (mxfp4-pack-quantized: MXFP4A16 and MXFP4): a power of two per 32 inputs, its biased
  exponent in a byte (`weight_scale` uint8, E8M0): w = e2m1 * 2^(scale - 127).

No chip this engine runs on multiplies FP4. Each e2m1 value doubled is an integer in [-12, 12], so the
weights load exactly into the 8-bit weight-only layout (INT8 [out, in], float32 scales per group
halved) and W8A16's kernels run them: one byte a weight instead of half a byte, 16-bit activations.
The FP4 activations of NVFP4 and MXFP4 (W4A4) are not quantized: the layer runs its weights with 16-bit
activations, as vLLM does on GPUs without FP4 matmuls.
"""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.layers.quantization.checkpoint_params import checkpoint_param
from sageinfer.layers.quantization.w8a16 import W8A16Method
from sageinfer.layers.quantization.w8a8 import per_row_scale_loader

# e2m1 magnitudes (the low three bits of a value) doubled: all integers
_DOUBLED = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12], dtype=torch.int8)
_E2M1_MAX = 6.0
_FP8_MAX = 448.0


def doubled_values(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 2] uint8, two e2m1 values a byte (the first in the low nibble) -> [rows, cols] int8
    holding each value times two."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), -1).reshape(packed.shape[0], -1).long()
    magnitude = _DOUBLED.to(packed.device)[nibbles & 7]
    return torch.where(nibbles >= 8, -magnitude, magnitude)


class Fp4Method(W8A16Method):
    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        self.mx = self.config.format == "mxfp4"
        self.group = self.block_k = self.config.group_size  # (16 for NVFP4, 32 for MXFP4: config.py)
        if local_in % self.group:
            raise ValueError(f"FP4 weights: {local_in} input features per rank do not hold whole groups of "
                             f"{self.group}")
        if not self.config.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            return layer.new_weight()
        checkpoint_param(layer, "weight_packed", torch.empty(local_out, local_in // 2, dtype=torch.uint8),
                         lambda t: t)
        scale = (lambda t: 2.0 ** (t.to(torch.int32) - 127).float()) if self.mx else (lambda t: t.float())
        checkpoint_param(layer, "weight_scale", torch.empty(local_out, local_in // self.group), scale)
        if not self.mx:
            layer.weight_global_scale = nn.Parameter(torch.zeros(local_out), requires_grad=False)
            layer.weight_global_scale.weight_loader = per_row_scale_loader(layer)  # one a tensor (a merged part)
        checkpoint_param(layer, "input_global_scale", torch.zeros(1), None)  # FP4 activations: unused

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.config.from_checkpoint:
            return self._quantize(layer)
        scale = layer.weight_scale.data / 2  # (halved: the values are doubled)
        if not self.mx:
            global_scale = layer.weight_global_scale.data
            if not bool((global_scale > 0).all()):
                raise ValueError("an NVFP4 layer's weight_global_scale is missing or not positive")
            scale = scale / global_scale[:, None]
        q = doubled_values(layer.weight_packed.data)
        for name in ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def _quantize(self, layer: nn.Module) -> None:
        """FP4 of the layer's full-precision weight as llm-compressor makes it (dummy weights for
        benchmarks), values rounded to the nearest e2m1 (saturating at 6): NVFP4 with a global scale
        putting the largest group scale at FP8's top and FP8 group scales; MXFP4 with each group's scale
        a power of two."""
        w = layer.weight.data.float()
        grouped = w.view(w.shape[0], -1, self.group)
        amax = grouped.abs().amax(-1).clamp(min=1e-30)
        if self.mx:
            scale = 2.0 ** (torch.floor(torch.log2(amax)) - 2)  # (the OCP MX rule: e2m1's top exponent is 2)
        else:
            global_scale = _FP8_MAX * _E2M1_MAX / w.abs().amax().clamp(min=1e-12)
            scale = (amax / _E2M1_MAX * global_scale).clamp(max=_FP8_MAX).to(torch.float8_e4m3fn)
            scale = scale.float().clamp(min=2 ** -9) / global_scale  # (the smallest FP8 subnormal)
        x = grouped / scale.unsqueeze(-1)
        bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)  # midpoints of e2m1
        magnitude = _DOUBLED.to(w.device)[torch.bucketize(x.abs(), bounds)]
        q = torch.where(x < 0, -magnitude, magnitude).view(w.shape)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale / 2, requires_grad=False)

