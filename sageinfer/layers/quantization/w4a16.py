"""4-bit weights, 16-bit activations (compressed-tensors pack-quantized, as llm-compressor's W4A16
recipes write it): `weight_packed` [out, in / 8] int32, `weight_scale` [out, groups], and for
asymmetric schemes `weight_zero_point` [out / 8, groups] packed along the output rows.

Small batches (decode) run the Triton kernel on the packed words; larger ones unpack the layer's
weights once and use the library GEMM, where the arithmetic, not the bytes, sets the pace.
"""
from __future__ import annotations

import torch
from torch import nn

from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.ops.w4a16 import dequantize, pack, unpack

# Up to this many rows the packed-weight kernel; beyond, unpack and the library GEMM.
_KERNEL_MAX_ROWS = 64


class W4A16Method:
    def __init__(self, config: QuantConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        group = self.config.group_size or local_in
        if local_in % 8 or local_in % group:
            raise ValueError(f"4-bit weights: {local_in} input features per rank do not hold whole groups of {group}")
        self.group = group
        groups = local_in // group
        if not self.config.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            layer.weight = nn.Parameter(torch.empty(local_out, local_in), requires_grad=False)
            layer.weight.weight_loader = layer.weight_loader
            return
        layer.weight_packed = nn.Parameter(torch.empty(local_out, local_in // 8, dtype=torch.int32), requires_grad=False)
        layer.weight_packed.weight_loader = layer.weight_loader
        layer.weight_scale = nn.Parameter(torch.empty(local_out, groups), requires_grad=False)
        layer.weight_scale.weight_loader = layer.weight_loader
        layer.weight_shape = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        layer.weight_shape.weight_loader = _ignore
        if self.config.symmetric:
            layer.register_buffer("weight_zero_point", torch.zeros(local_out, groups, dtype=torch.int32))
        else:
            layer.weight_zero_point = nn.Parameter(torch.zeros(local_out, groups, dtype=torch.int32),
                                                   requires_grad=False)

            def load_zero_points(param, loaded, shard_id=None):
                # packed along the output rows, eight to a word, stored with an offset of 8 (output
                # sizes are multiples of 8, so no row is padding)
                layer.weight_loader(param, (unpack(loaded.t().contiguous()).t() - 8).contiguous(), shard_id)
            layer.weight_zero_point.weight_loader = load_zero_points

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.config.from_checkpoint:
            return
        dtype = layer.weight.dtype
        w = layer.weight.data.float()
        grouped = w.view(w.shape[0], -1, self.group)
        scale = grouped.abs().amax(dim=-1).clamp(min=1e-12) / 7.5  # symmetric: [-8, 7] spans 15 steps
        q = (grouped / scale.unsqueeze(-1)).round().clamp(-8, 7) + 8
        del layer.weight
        layer.weight_packed = nn.Parameter(pack(q.view(w.shape[0], -1)), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale.to(dtype), requires_grad=False)
        layer.register_buffer("weight_zero_point", torch.zeros_like(scale, dtype=torch.int32))

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda and x2.shape[0] <= _KERNEL_MAX_ROWS:
            from sageinfer.ops.w4a16 import w4a16_matmul
            y = w4a16_matmul(x2, layer.weight_packed, layer.weight_scale, layer.weight_zero_point, self.group)
        else:
            w = dequantize(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, self.group, x.dtype)
            y = torch.nn.functional.linear(x2, w)
        return y.reshape(*shape[:-1], y.shape[-1])


def _ignore(param, loaded, shard_id=None) -> None:
    """weight_shape: the checkpoint's record of the unpacked shape, which the layer knows already."""
