"""bitsandbytes 4-bit checkpoints (`quant_method: bitsandbytes` with `load_in_4bit`, NF4 or FP4, as
transformers saves them and as many pre-quantized releases hold them). Each layer's tensors in the file:
- `weight`: uint8 [out * in / 2, 1], the [out, in] matrix's codes row by row, two a byte (the first in the
  high nibble);
- `weight.absmax`: a scale per block of `blocksize` codes (float32, or with double quantization uint8
  indices into `weight.nested_quant_map`, times `weight.nested_absmax` per 256 blocks, plus an offset);
- `weight.quant_map`: the 16 values a code indexes;
- `weight.quant_state.bitsandbytes__nf4` (or `__fp4`): the rest as JSON bytes (shape, blocksize, nested
  block size and offset).

checkpoint_stream gathers a layer's pieces as they load and yields them in the layout the layer holds:
`weight` uint8 [out, in / 2], `weight_absmax` float32 [out, in / 64] (a larger block's scale repeated) and
`weight_table` [16]. The weights stay at four bits in memory: up to LUT4_GEMV_MAX_ROWS rows the layer reads
them as they are (ops/gemv_lut4.py), above it expands them for the library GEMM (ops/lut4_weights.py).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sageinfer.layers.quantization.checkpoint_params import checkpoint_param
from sageinfer.layers.quantization.config import QuantConfig
from sageinfer.ops.gemv_lut4 import LUT4_GEMV_MAX_ROWS, lut4_gemv
from sageinfer.ops.lut4_weights import lut4_expand, lut4_expand_kernel, lut4_quantize

BLOCK = 64  # the held scales' block: bitsandbytes' default for 4-bit; its larger blocks are repeated to it
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])  # (dummy weights: bitsandbytes' NF4 table)
_PIECES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _absmax(pieces: dict, state: dict) -> torch.Tensor:
    """The blocks' scales in float32 (double quantization undone)."""
    absmax = pieces["absmax"]
    if "nested_blocksize" not in state:
        return absmax.float()
    nested = state["nested_blocksize"]
    values = pieces["nested_quant_map"].float()[absmax.long()]
    return values * pieces["nested_absmax"].float().repeat_interleave(nested)[:len(absmax)] + state["nested_offset"]


def _decoded(layer: str, pieces: dict) -> list[tuple[str, torch.Tensor]]:
    state = json.loads(bytes(pieces["state"].tolist()).decode())
    (out, inp), block = state["shape"], state["blocksize"]
    if inp % block or block % BLOCK:
        raise ValueError(f"{layer}: bitsandbytes blocks of {block} over rows of {inp} inputs are not supported "
                         f"(blocks a multiple of {BLOCK} that divide a row)")
    absmax = _absmax(pieces, state).reshape(out, inp // block).repeat_interleave(block // BLOCK, 1)
    return [(f"{layer}.weight", pieces["weight"].reshape(out, inp // 2)), (f"{layer}.weight_absmax", absmax),
            (f"{layer}.weight_table", pieces["quant_map"].float())]


def checkpoint_stream(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors with each bitsandbytes 4-bit layer's pieces replaced, once all have come, by
    the layer's held tensors (_decoded); every other tensor as it is."""
    layers: dict[str, dict] = {}
    for name, tensor in weights:
        head, sep, piece = name.partition(".weight.")
        if sep and (piece in _PIECES or piece.startswith("quant_state.bitsandbytes__")):
            key = "state" if piece.startswith("quant_state.") else piece
        elif name.endswith(".weight") and tensor.dtype == torch.uint8:
            head, key = name[:-len(".weight")], "weight"
        else:
            yield name, tensor
            continue
        pieces = layers.setdefault(head, {})
        pieces[key] = tensor
        if {"weight", "absmax", "quant_map", "state"} <= pieces.keys() and (
                "nested_absmax" in pieces and "nested_quant_map" in pieces or pieces["absmax"].dtype != torch.uint8):
            yield from _decoded(head, layers.pop(head))
    if layers:
        raise ValueError(f"bitsandbytes 4-bit layers with pieces missing: {sorted(layers)[:3]}")


class Bnb4Method:
    def __init__(self, config: QuantConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, local_out: int, local_in: int) -> None:
        if local_in % BLOCK:
            raise ValueError(f"bitsandbytes 4-bit weights: {local_in} input features per rank do not hold whole "
                             f"blocks of {BLOCK}")
        if not self.config.from_checkpoint:  # full-precision weights (dummy ones), quantized after loading
            return layer.new_weight()
        checkpoint_param(layer, "weight", torch.empty(local_out, local_in // 2, dtype=torch.uint8), lambda t: t)
        checkpoint_param(layer, "weight_absmax", torch.empty(local_out, local_in // BLOCK), lambda t: t)
        checkpoint_param(layer, "weight_table", torch.empty(16), "keep")

    def process_after_loading(self, layer: nn.Module) -> None:
        if not self.config.from_checkpoint:
            codes, absmax = lut4_quantize(layer.weight.data, NF4.to(layer.weight.device), BLOCK)
            layer.weight = nn.Parameter(codes, requires_grad=False)
            layer.weight_absmax = nn.Parameter(absmax, requires_grad=False)
            layer.weight_table = nn.Parameter(NF4.to(codes.device), requires_grad=False)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight the codes, their table and the blocks' scales encode, in float32."""
        return lut4_expand(layer.weight, layer.weight_absmax, layer.weight_table, BLOCK, torch.float32)

    def kernel_rows(self, layer: nn.Module) -> int:
        """The most rows on this method's own Triton kernel (what a start-up compiles ahead)."""
        return LUT4_GEMV_MAX_ROWS

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weights = (layer.weight, layer.weight_absmax, layer.weight_table)
        x2 = x.reshape(-1, x.shape[-1])
        if layer.use_triton and x2.shape[0] <= LUT4_GEMV_MAX_ROWS:
            return lut4_gemv(x2, *weights, BLOCK).reshape(*x.shape[:-1], -1)
        expand = lut4_expand_kernel if layer.use_triton else lut4_expand
        return nn.functional.linear(x, expand(*weights, BLOCK, x.dtype))
