"""8-bit integer weights, 16-bit activations, from the checkpoint formats that carry them:

- compressed-tensors pack-quantized (llm-compressor's W8A16): `weight_packed` [out, in / 4] int32,
  four bytes a word along the input, each value stored plus 128; `weight_scale` [out, groups]; with
  actorder "group", `weight_g_idx` [in]; asymmetric: `weight_zero_point` [out / 4, groups] packed
  along the output the same way;
- GPTQ 8-bit (as Qwen's GPTQ-Int8 releases): `qweight` [in / 4, out] packed along the input the same
  way, `scales` [groups, out], `qzeros` [groups, out / 4] (128 for every symmetric group; stored minus
  one in the original format), `g_idx` [in].

Each loads into one layout: INT8 [out, in] (the value less 128) with scales [out, groups]. One row
goes through the skinny kernel with the group scales applied to the weights in registers
(ops/gemv_grouped.py, the norm, activation and residual fusions of 16-bit layers); up to 64 rows
through the 8-bit weight-only kernel (ops/weight_only.py: the bytes and scales read once, the dot in
fp16 on the raw integers); more rows expand the weight in one pass for the library GEMM.

Asymmetric weights, w = scale * (q - zero), run the same kernels on scale * q and subtract each
group's scale * zero times the sum of the input over that group: one [rows, groups] x [groups, out]
matmul beside the kernel (the result is rounded to the activations' dtype before the subtraction;
one row takes the general path, without the norm and residual fusions).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from sageinfer.layers.quantization.checkpoint_params import (checkpoint_param, g_idx_param, group_order,
                                                               ordered_input)
from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.ops.weight_only import (W8A16_MAX_ROWS, dequantize_8bit_groups, dequantize_8bit_groups_kernel,
                                       w8a16_block_matmul)


# Few rows' matmuls through the 8-bit weight-only kernel have as few as 64 programs (o and down at
# Qwen3-8B shapes, 16 rows), which leaves most processors idle: the kernel splits K too, up to twice the
# platform's compute units of programs (H200, block FP8's T2 at 32 sequences: 3,764 -> 5,074 tok/s).
# SAGEINFER_8BIT_MIN_PROGRAMS=n sets the programs instead (0: no split).
_MIN_PROGRAMS = os.environ.get("SAGEINFER_8BIT_MIN_PROGRAMS")


def split_k_programs(layer: nn.Module) -> int:
    """The programs the 8-bit weight-only kernel splits K to reach for this layer (prepare's choice)."""
    if _MIN_PROGRAMS is not None:
        return int(_MIN_PROGRAMS)
    return 2 * layer.platform.num_compute_units() if layer.platform is not None else 0


def unpack_bytes(words: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 4] int32, four values stored plus 128 a word (the first in the lowest byte) ->
    [rows, cols] int8 values."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32, device=words.device)
    values = ((words.unsqueeze(-1) >> shifts) & 0xFF) - 128
    return values.reshape(words.shape[0], -1).to(torch.int8)


class W8A16Method:
    def __init__(self, config: QuantConfig):
        self.config = config
        self.gptq, self.bnb = config.format == "gptq", config.format == "bitsandbytes"
        self.packed_name, self.scale_name = ("qweight", "scales") if self.gptq else ("weight_packed", "weight_scale")
        self.g_idx_name = "g_idx" if self.gptq else ("weight_g_idx" if config.desc_act else None)
        self.min_programs = 0  # split K up to this many programs (prepare sets it for the platform)

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        c = self.config
        self.group = c.group_size or local_in
        self.block_k = min(64, self.group & -self.group)  # the kernel's K tile: a power of two dividing the group
        if local_in % 4 or local_in % self.group:
            raise ValueError(f"8-bit weights: {local_in} input features per rank do not hold whole groups of "
                             f"{self.group}")
        if not c.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            return layer.new_weight()
        if self.bnb:
            return self._bnb_weights(layer, local_out, local_in)
        groups = local_in // self.group
        transpose = (lambda t: t.t()) if self.gptq else (lambda t: t)
        checkpoint_param(layer, self.packed_name, torch.empty(local_out, local_in // 4, dtype=torch.int32), transpose)
        checkpoint_param(layer, self.scale_name, torch.empty(local_out, groups), transpose)
        zeros = torch.zeros(local_out, groups, dtype=torch.int32)
        if self.gptq:
            offset = 0 if c.gptq_v2 else 1  # the original format stores each zero point minus one
            checkpoint_param(layer, "qzeros", zeros, lambda t: _gptq_zeros(t, offset, c.symmetric))
        else:
            checkpoint_param(layer, "weight_shape", torch.zeros(2, dtype=torch.int64), None)
            if not c.symmetric:  # packed along the output: [out / 4, groups]
                checkpoint_param(layer, "weight_zero_point", zeros, lambda t: unpack_bytes(t.t().contiguous()).t())
        g_idx_param(layer, self.g_idx_name, c.desc_act, local_in, "8-bit weights")

    def _bnb_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        checkpoint_param(layer, "weight", torch.empty(local_out, local_in, dtype=torch.int8), lambda t: t)
        checkpoint_param(layer, "SCB", torch.empty(local_out), lambda t: t)  # (one a row: whole on a row split)
        checkpoint_param(layer, "weight_format", torch.zeros((), dtype=torch.uint8), "keep")
        layer.weight_format.optional = True  # (older files lack it: the row layout)

    def _bnb_after_loading(self, layer: nn.Module) -> None:
        if int(layer.weight_format) != 0:
            raise ValueError(f"bitsandbytes 8-bit weights in layout {int(layer.weight_format)} (a GPU-specific "
                             "tile order); supported: the row layout (0), which bitsandbytes saves since 0.45")
        scale = layer.SCB.data.float().unsqueeze(1) / 127
        del layer.SCB, layer.weight_format
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.config.from_checkpoint:
            return self._quantize(layer)
        if self.bnb:
            return self._bnb_after_loading(layer)
        q = unpack_bytes(getattr(layer, self.packed_name).data)
        if self.config.desc_act:  # put each group's columns together; inputs follow at run time
            order = group_order(getattr(layer, self.g_idx_name).data, self.group, self.g_idx_name)
            if order is not None:
                q = q[:, order].contiguous()
                layer.register_buffer("input_order", order)
        scale = getattr(layer, self.scale_name).data.float()  # as the kernels read them
        if not self.config.symmetric:
            zeros = getattr(layer, "qzeros" if self.gptq else "weight_zero_point").data
            layer.register_buffer("weight_offset", scale * zeros)
        for name in (self.packed_name, self.scale_name, "qzeros", "weight_zero_point", "weight_shape",
                     self.g_idx_name):
            if name is not None and hasattr(layer, name):
                delattr(layer, name)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def _quantize(self, layer: nn.Module) -> None:
        """INT8 per group of the layer's full-precision weight (dummy weights for benchmarks), with zero
        points where the config is asymmetric."""
        w = layer.weight.data.float()
        grouped = w.view(w.shape[0], -1, self.group)
        if self.config.symmetric:
            scale = grouped.abs().amax(dim=-1).clamp(min=1e-12) / 127
            zeros = torch.zeros_like(scale)
        else:  # the group's range onto [-128, 127]
            low, high = grouped.amin(dim=-1).clamp(max=0), grouped.amax(dim=-1).clamp(min=0)
            scale = ((high - low) / 255).clamp(min=1e-12)
            zeros = (-128 - (low / scale).round()).clamp(-128, 127)
            layer.register_buffer("weight_offset", scale * zeros)
        q = ((grouped / scale.unsqueeze(-1)).round() + zeros.unsqueeze(-1)).clamp(-128, 127)
        layer.weight = nn.Parameter(q.to(torch.int8).view(w.shape), requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def prepare(self, layer: nn.Module) -> None:
        """Before serving (outside graphs): the platform's programs for small batches."""
        self.min_programs = split_k_programs(layer)

    def kernel_rows(self, layer: nn.Module) -> int:
        """The most rows on this method's own Triton kernels (what a start-up compiles ahead)."""
        return W8A16_MAX_ROWS if self.block_k >= 16 else 0

    def one_row_args(self, layer: nn.Module) -> dict | None:
        """One row reads the bytes in the skinny kernel, each group's scale applied to the weight chunk
        in registers (a scale per row: applied to the sums); not where the inputs must be reordered
        first (act-order), groups are not a power of two (the kernel walks whole groups) or zero points
        must be subtracted."""
        if hasattr(layer, "input_order") or hasattr(layer, "weight_offset"):
            return None
        scale = layer.weight_scale
        if scale.shape[1] == 1:
            return {"weight": layer.weight, "weight_scale": scale[:, 0]}
        if self.group & (self.group - 1):
            return None
        return {"weight": layer.weight, "weight_scale": scale}

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = ordered_input(layer, x)
        if layer.use_triton and x2.shape[0] <= W8A16_MAX_ROWS and self.block_k >= 16:
            y = w8a16_block_matmul(x2, layer.weight, layer.weight_scale, self.group, block_k=self.block_k,
                                   min_programs=self.min_programs)
        else:  # the weight expanded (in one pass where kernels run) for the library GEMM
            expand = dequantize_8bit_groups_kernel if layer.use_triton else dequantize_8bit_groups
            y = nn.functional.linear(x2, expand(layer.weight, layer.weight_scale, self.group, x.dtype))
        offset = getattr(layer, "weight_offset", None)
        if offset is not None:  # each group's scale * zero times the input's sum over the group
            sums = x2.float().view(x2.shape[0], -1, self.group).sum(-1)
            y = (y.float() - sums @ offset.t()).to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


def _gptq_zeros(qzeros: torch.Tensor, offset: int, symmetric: bool) -> torch.Tensor:
    """GPTQ's zero points [groups, out / 4] -> [out, groups], less 128 (as the weights are held). A
    checkpoint that says it is symmetric must hold 128 in every one."""
    zeros = unpack_bytes(qzeros).to(torch.int32) + offset
    if symmetric and bool((zeros != 0).any()):
        raise ValueError("8-bit GPTQ checkpoint with sym true but zero points other than 128: its "
                         "quantization_config should say sym false")
    return zeros.t()
