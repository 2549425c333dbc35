"""4-bit weights, 16-bit activations, from the checkpoint formats that carry them:

- compressed-tensors pack-quantized (llm-compressor's W4A16): `weight_packed` [out, in / 8] int32
  packed along the input, `weight_scale` [out, groups], for asymmetric schemes `weight_zero_point`
  [out / 8, groups] packed along the output, every 4-bit value stored with an offset of 8; with
  actorder "group", `weight_g_idx` [in] as GPTQ's g_idx;
- GPTQ: `qweight` [in / 8, out] packed along the input, `scales` [groups, out], `qzeros` [groups,
  out / 8] packed along the output (stored minus one in the original format), `g_idx` [in] (the group
  of each input column: out of order with desc_act);
- AWQ (GEMM layout): `qweight` [in, out / 8] and `qzeros` [groups, out / 8] packed along the output in
  the order 0 2 4 6 1 3 5 7, `scales` [groups, out].

Each is converted as it loads into one layout (packed [out, in / 8] along the input, interleaved in
slices of up to 128 columns, scales and signed zero points [out, groups]; ops/weight_only.py), so
one kernel serves all. One row (decode of one sequence) reads the packed words in the skinny kernel
(ops/gemv_int4.py), 2 to 32 rows in its tensor-core form; more rows expand the layer's weights in one
pass and use the library GEMM (on an H200 at Qwen3-8B shapes the tiled Triton kernel took 5x the
expansion's time at 16 to 64 rows: benchmarks/results/2026-12-01-h200-w4a16.md; three Triton GEMMs that
dequantize in registers took 1.1-7x its time at 48 to 256 rows: 2026-12-03e-h200-w4a16-gemm.md,
2026-12-03f-h200-suite-fp4-start-up.md; expanding a chunk of output rows at a time into one reused buffer,
so that the expanded bytes stay in L2, took 1.06-1.85x the whole expansion at 256 rows on an H100, its
narrower GEMMs filling fewer processors: 2026-12-06d-h100-suite-w4a16-chunked-expansion.md).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from sageinfer.layers.quantization.checkpoint_params import (checkpoint_param, g_idx_param, group_order,
                                                               ordered_input)
from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.ops.gemv import gemv
from sageinfer.ops.gemv_int4 import w4a16_mma_matmul
from sageinfer.ops.weight_only import dequantize, dequantize_kernel, pack, slice_width_for, unpack

# The one-row kernel unpacks a slice of columns at a time: narrower slices (odd input sizes) take
# the expansion.
_ONE_ROW_MIN_SLICE = 16
# 2 to 32 rows take the tensor-core kernel: on an H200 at Qwen3-8B shapes it held gate_up at ~50 us
# from 1 to 16 rows, where the CUDA-core kernel took 98-212 us and the expansion 134 us; at 64 rows
# (two tiles of 32) it equalled the expansion (benchmarks/results/2026-12-01-h200-w4a16-rows.md).
# SAGEINFER_W4A16_MMA_MAX_ROWS=0 sends those rows to the expansion instead, to compare.
MMA_MAX_ROWS = int(os.environ.get("SAGEINFER_W4A16_MMA_MAX_ROWS", "32"))
# Those rows' matmuls as few as 64-96 programs (o, down and qkv at Qwen3-8B shapes) leave an H200's 132
# processors half idle; SAGEINFER_W4A16_SPLIT_K=0 splits them over input features too, to fill twice
# the processors (w4a16_mma_matmul's split_k). 1, no split, until timed on a GPU
# (benchmarks/experiments/time_int4_step.py, path "mma split").
_SPLIT_K = int(os.environ.get("SAGEINFER_W4A16_SPLIT_K", "1"))


_AWQ_COLUMN_OF_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]  # column j of a word sits at nibble _AWQ_...[j]


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 8] AWQ words -> [rows, cols] values in column order."""
    nibbles = unpack(words).view(words.shape[0], -1, 8)
    return nibbles[:, :, _AWQ_COLUMN_OF_NIBBLE].reshape(words.shape[0], -1)


class _CompressedTensors:
    names = ("weight_packed", "weight_scale", "weight_zero_point")

    def packed(self, t):
        return t

    def scales(self, t):
        return t

    def zeros(self, t):
        return unpack(t.t().contiguous()).t() - 8


class _GPTQ:
    names = ("qweight", "scales", "qzeros")

    def __init__(self, v2: bool):
        self.zero_offset = 0 if v2 else 1  # the original format stores each zero point minus one

    def packed(self, t):
        return t.t()

    def scales(self, t):
        return t.t()

    def zeros(self, t):
        return unpack(t).t() + self.zero_offset - 8


class _AWQ:
    names = ("qweight", "scales", "qzeros")

    def packed(self, t):
        return pack(_awq_unpack(t).t().contiguous())

    def scales(self, t):
        return t.t()

    def zeros(self, t):
        return _awq_unpack(t).t() - 8


class W4A16Method:
    # At one row a gated input costs the 4-bit loop half again its instructions: the MLP activates in
    # its gate_up matmul instead (layers/linear.py, one_row_activates_before).
    plain_one_row_input = True

    def __init__(self, config: QuantConfig):
        self.config = config
        self.format = {"compressed-tensors": _CompressedTensors(), "gptq": _GPTQ(config.gptq_v2),
                       "awq": _AWQ()}[config.format]
        self.packed_name, self.scale_name, self.zero_name = self.format.names
        self.num_sms = None  # the platform's compute units, once prepare() has run

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        c = self.config
        group = c.group_size or local_in
        if local_in % 8 or local_in % group:
            raise ValueError(f"4-bit weights: {local_in} input features per rank do not hold whole groups of {group}")
        self.group = group
        self.slice_width = slice_width_for(local_in, group)
        groups = local_in // group
        if not c.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            return layer.new_weight()
        f = self.format
        checkpoint_param(layer, self.packed_name, torch.empty(local_out, local_in // 8, dtype=torch.int32), f.packed)
        checkpoint_param(layer, self.scale_name, torch.empty(local_out, groups), f.scales)
        if not (c.symmetric and c.format == "compressed-tensors"):  # (symmetric ones hold no zero points)
            checkpoint_param(layer, self.zero_name, torch.zeros(local_out, groups, dtype=torch.int32), f.zeros)
        if c.format == "compressed-tensors":
            checkpoint_param(layer, "weight_shape", torch.zeros(2, dtype=torch.int64), None)
        g_idx_param(layer, self.g_idx_name, c.desc_act, local_in, "4-bit weights")

    @property
    def g_idx_name(self) -> str | None:
        """Each input column's group, as the checkpoint names it (GPTQ always holds one; compressed-tensors
        only for groups in activation order)."""
        if self.config.format == "gptq":
            return "g_idx"
        return "weight_g_idx" if self.config.format == "compressed-tensors" and self.config.desc_act else None

    def process_after_loading(self, layer: nn.Module) -> None:
        c = self.config
        if not c.from_checkpoint:
            return self._quantize(layer)
        packed = getattr(layer, self.packed_name)
        columns = unpack(packed.data)
        if c.desc_act:  # put each group's columns together; inputs follow at run time
            order = group_order(getattr(layer, self.g_idx_name).data, self.group, self.g_idx_name)
            if order is not None:
                columns = columns[:, order]
                layer.register_buffer("input_order", order)
        packed.data = pack(columns, self.slice_width)

    def _quantize(self, layer: nn.Module) -> None:
        dtype = layer.weight.dtype
        w = layer.weight.data.float()
        grouped = w.view(w.shape[0], -1, self.group)
        scale = grouped.abs().amax(dim=-1).clamp(min=1e-12) / 7.5  # symmetric: [-8, 7] spans 15 steps
        q = (grouped / scale.unsqueeze(-1)).round().clamp(-8, 7) + 8
        del layer.weight
        packed = pack(q.view(w.shape[0], -1), self.slice_width)
        setattr(layer, self.packed_name, nn.Parameter(packed, requires_grad=False))
        setattr(layer, self.scale_name, nn.Parameter(scale.to(dtype), requires_grad=False))

    def prepare(self, layer: nn.Module) -> None:
        """Before serving: the platform's compute units, which the tensor-core matmul's tiles follow."""
        self.num_sms = layer.platform.num_compute_units()

    def kernel_rows(self, layer: nn.Module) -> int:
        """The most rows whose matmul runs this method's own Triton kernels (where the platform runs
        Triton): what a start-up compiles ahead (executor/linear_warm_up.py)."""
        return MMA_MAX_ROWS if self.slice_width >= _ONE_ROW_MIN_SLICE else 0

    def one_row_args(self, layer: nn.Module) -> dict | None:
        """One row (decode of one sequence) reads the packed words in the skinny kernel (ops/gemv.py),
        unpacking and scaling each group in registers, with the norm and residual fusions of 16-bit
        layers; not where the inputs must be reordered first (act-order) or a group is too wide for
        the kernel's chunks."""
        return None if hasattr(layer, "input_order") else self._gemv_args(layer)

    def _gemv_args(self, layer: nn.Module) -> dict | None:
        if self.slice_width < _ONE_ROW_MIN_SLICE:
            return None
        return {"weight": getattr(layer, self.packed_name), "weight_scale": getattr(layer, self.scale_name),
                "weight_zero": getattr(layer, self.zero_name, None), "int4": True, "slice_width": self.slice_width}

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = ordered_input(layer, x)
        packed, scales = getattr(layer, self.packed_name), getattr(layer, self.scale_name)
        kernels = layer.use_triton  # the platform's kernel choice (Triton)
        rows = x2.shape[0]
        gemv_args = self._gemv_args(layer) if kernels and rows <= max(1, MMA_MAX_ROWS) else None
        if gemv_args is not None and rows == 1:
            y = gemv(x2.contiguous(), **gemv_args)
        elif gemv_args is not None:
            y = w4a16_mma_matmul(x2, gemv_args["weight"], gemv_args["weight_scale"], gemv_args["weight_zero"],
                                 self.group, self.slice_width, num_sms=self.num_sms, split_k=_SPLIT_K)
        else:  # the weight expanded (in one pass where kernels run) for the library GEMM
            expand = dequantize_kernel if kernels else dequantize
            zeros = getattr(layer, self.zero_name, None)  # (symmetric layers hold none)
            y = torch.nn.functional.linear(x2, expand(packed, scales, zeros, self.group, x.dtype, self.slice_width))
        return y.reshape(*shape[:-1], y.shape[-1])
