"""Linear layers that own their weight loading (stacked q/k/v and gate/up shards, and each
tensor-parallel rank's part).

Weights are created uninitialised (torch.empty): the loader fills them, so building an 8B model
costs no init time and no second copy.
"""
from __future__ import annotations

import os

import torch
from torch import nn
import torch.nn.functional as F

from sageinfer.distributed.parallel_state import get_tp_group, kv_head_range
from sageinfer.layers.quantization.config import get_quant_config

# One row: the MLP's gate_up matmul can hand out silu(gate) * up itself (each program pairs gate rows
# with their up rows), instead of every program of the down projection forming it from [gate, up] (a
# W4A16 down's sm_90 loop: 1,312 instructions a trip against 855 with a plain input). Qwen3-8B L1 on an
# H200 (2026-12-02g-h200-w4a16-one-row-defaults.md): W4A16 TPOT 4.51 -> 3.92 ms (with quad sums), bf16
# 4.91 -> 4.97 through ops/gemv.py's element-wise kernel (slower). Through the word kernel
# (ops/gemv_words.py) it is the faster order: bf16 TPOT 4.47 -> 4.30 ms, FP8 W+KV 3.09 -> 3.03
# (2026-12-04c-h200-one-row-activate-words.md). So it is on where the down projection's method asks for a
# plain input (plain_one_row_input) or its one-row matmul reads words; SAGEINFER_ONE_ROW_ACTIVATE=1 or 0
# forces it on or off for every layer.
ONE_ROW_ACTIVATE = {"1": True, "0": False}.get(os.environ.get("SAGEINFER_ONE_ROW_ACTIVATE", "auto"))


def one_row_activates_before(down: "Linear", x: torch.Tensor) -> bool:
    """Whether a one-row MLP on x activates in its gate_up matmul (down takes a plain input) or in down."""
    if ONE_ROW_ACTIVATE is not None:
        return ONE_ROW_ACTIVATE
    if getattr(down.quant, "plain_one_row_input", False):
        return True
    args = down._one_row_weight(x)
    if args is None:
        return False
    from sageinfer.ops.gemv_words import reads_words  # Triton only where a one-row path is taken
    return reads_words(args["weight"], args.get("weight_scale"), x.dtype)


class Linear(nn.Module):
    """parallel: None (the whole layer on every rank), "column" (output rows split over the
    tensor-parallel ranks) or "row" (input columns split; each rank's partial product is summed over
    the ranks, then the bias added once). Shapes given are the whole layer's; each rank keeps and
    loads its part."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel: str | None = None):
        super().__init__()
        self.tp = get_tp_group()
        self.parallel = parallel if self.tp.size > 1 else None
        quant = get_quant_config()
        self.in_features, self.out_features = in_features, out_features
        self._split(quant)
        self.shard_offsets: dict = {}  # merged layers: shard id -> (first row, rows)
        self.quant = None  # the quantization method (layers/quantization), None: full precision
        self._rows_in, self._full_precision, self._meta_weight = 0, None, None  # (quantized after loading: new_weight)
        if quant is not None and not quant.groups:
            self._create_quantized(quant)
        else:  # full precision, or a mixed checkpoint's layer until its name picks its group (set_quantization)
            self.new_weight()
        if bias:
            self._new_bias()
        else:
            self.register_parameter("bias", None)
        self.use_triton = False  # set by the model runner from the platform's kernel choice
        self.platform = None  # set by the model runner: the chip's library GEMMs (8-bit layers)

    def _split(self, quant) -> None:
        """This rank's share of the layer (local_shape) and how the ranks' results combine (reduces).
        Act-order groups (GPTQ desc_act) scatter each group's input columns over every rank's share: a
        row-parallel layer of them splits its outputs instead (whole groups on every rank, exact),
        gathering its input from the ranks before the matmul and its output to them after."""
        self.gathers = self.parallel == "row" and quant is not None and quant.desc_act
        if self.gathers:
            self.parallel = "column"
        self.reduces = self.parallel == "row" or self.gathers  # (an all-reduce, or the gathers, ends the layer)
        local_in = self.tp.split(self.in_features) if self.parallel == "row" else self.in_features
        local_out = self.tp.split(self.out_features) if self.parallel == "column" else self.out_features
        self.local_shape = (local_out, local_in)

    def _new_bias(self) -> None:
        self.bias = nn.Parameter(torch.empty(self.local_shape[0]), requires_grad=False)
        self.bias.weight_loader = self.weight_loader

    def _create_quantized(self, quant) -> None:
        from sageinfer.layers.quantization.fp8_block import Fp8BlockMethod
        from sageinfer.layers.quantization.bnb4 import Bnb4Method
        from sageinfer.layers.quantization.fp4 import Fp4Method
        from sageinfer.layers.quantization.w4a16 import W4A16Method
        from sageinfer.layers.quantization.w8a8 import W8A8Method
        from sageinfer.layers.quantization.w8a16 import W8A16Method
        method = {"w4a16": W4A16Method, "w8a16": W8A16Method, "fp8-block": Fp8BlockMethod,
                  "fp4": Fp4Method, "bnb4": Bnb4Method}.get(quant.scheme, W8A8Method)
        self.quant = method(quant)
        self.quant.create_weights(self, *self.local_shape)

    def set_quantization(self, quant) -> None:
        """A full-precision layer of a mixed checkpoint takes its group's scheme: its tensors made anew
        (an act-order group's row-parallel layer split by outputs instead, with its bias)."""
        device = self.weight.device
        del self.weight
        with torch.device(device):
            if self.parallel == "row" and quant.desc_act:
                self._split(quant)
                if self.bias is not None:
                    self._new_bias()
            self._create_quantized(quant)

    def drop_quantization(self, weight: torch.Tensor | None = None) -> None:
        """Keep this layer in full precision: a checkpoint's ignore list (an empty weight, loaded as any
        other), or `weight`, multiplied out of the quantized one (FP8 on a device without FP8)."""
        if self.quant is not None:
            device = self._full_precision[1] if self._full_precision is not None else \
                next(iter(self.parameters())).device  # (a weight quantized after loading is a meta tensor yet)
            quantized = [n for n, _ in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]
                         if n != "bias"]
            for name in quantized:
                delattr(self, name)
            self.quant = None
            if weight is None:
                self.new_weight(torch.get_default_dtype(), device)
            else:
                self.weight = nn.Parameter(weight, requires_grad=False)
                self.weight.weight_loader = self.weight_loader

    def new_weight(self, dtype: torch.dtype | None = None, device=None) -> None:
        """The layer's [out, in] weight for this rank, empty, loaded like a checkpoint tensor (a
        quantization method passes its 8-bit dtype, or none for weights it quantizes after loading).
        Weights quantized after loading take memory only from their first rows' arrival (a meta tensor until
        then), and the layer converts once all its rows are in (_rows_arrived): a load never holds the whole
        model in full precision."""
        self._rows_in, self._full_precision, self._meta_weight = 0, None, None
        if self.quant is not None and not self.quant.config.from_checkpoint:
            self._full_precision = (dtype or torch.get_default_dtype(), device or torch.get_default_device())
            device = "meta"
        self.weight = nn.Parameter(torch.empty(self.local_shape, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if self._full_precision is not None:  # (held unregistered: not a parameter of the layer)
            self.__dict__["_meta_weight"] = self.weight

    def _materialize(self, param: nn.Parameter) -> nn.Parameter:
        """The parameter a checkpoint tensor goes to: a weight to be quantized after loading (the loader's
        table names its meta tensor) gets its memory as its first rows arrive."""
        if param is not self._meta_weight:
            return param
        if self._full_precision is None:
            raise ValueError("a layer quantized at load time was given its weight's rows twice")
        if self.weight is param:
            dtype, device = self._full_precision
            self.weight = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        return self.weight

    def _rows_arrived(self, param: nn.Parameter, rows: int) -> None:
        """Once every row of a weight quantized after loading is in, quantize it (which replaces the
        full-precision weight, freed with it)."""
        if self._full_precision is None or param is not self.weight:
            return
        self._rows_in += rows
        if self._rows_in >= self.local_shape[0]:
            self.quant.process_after_loading(self)
            self._full_precision = None

    def process_after_loading(self) -> None:
        # (a layer quantized after loading did so as its last rows arrived: _rows_arrived)
        if self.quant is not None and self.quant.config.from_checkpoint:
            self.quant.process_after_loading(self)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T (no bias), in x's dtype."""
        if self.quant is not None:
            one_row_weight = self._one_row_weight(x)
            if one_row_weight is not None:  # 8- or 4-bit weights with their scales in the skinny kernel
                return _gemv(x, **one_row_weight)
            return self.quant.apply(self, x)
        return linear(x, self.weight, None, self.use_triton)

    def _rank_part(self, param: nn.Parameter, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole checkpoint tensor."""
        if self.parallel == "column":
            return loaded.narrow(0, self.tp.rank * param.shape[0], param.shape[0])
        if self.parallel == "row" and loaded.dim() == 2:  # a row-parallel bias is whole on every rank
            return loaded.narrow(1, self.tp.rank * param.shape[1], param.shape[1])
        return loaded

    def whole_rows(self, shard_id=None) -> int:
        """Rows of the whole checkpoint tensor that this layer (a merged one: its projection shard_id)
        loads its part of."""
        return self.out_features

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = self._rank_part(param, loaded)
        if param.shape != loaded.shape:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
        param = self._materialize(param)
        param.data.copy_(loaded)
        self._rows_arrived(param, param.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduces and self.quant is None:
            return linear(x, self.weight, self.bias, self.use_triton)
        if self.gathers:  # this rank's outputs from every rank's inputs
            y = self._matmul(self.tp.all_gather_last_dim(x))
            return self.tp.all_gather_last_dim(y if self.bias is None else y + self.bias)
        return self._finish(self._matmul(x))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's product summed over the ranks where the layer reduces, plus the bias."""
        if self.reduces:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def _quantized_input(self, x: torch.Tensor) -> tuple[str, float] | None:
        """(scheme, half range) where this layer would quantize the rows x per row itself, so that the
        kernel before it may write them in 8 bits instead (ops/quantize_fused.py); else None."""
        if self.quant is None or self.gathers or self._one_row_weight(x) is not None:
            return None
        return getattr(self.quant, "fused_input", lambda layer: None)(self)

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module):
        """(self(norm(x + residual)), x + residual), or without residual (the first layer) (self(norm(x)), x).
        Where this layer quantizes its input per row, the norm kernel writes it in 8 bits."""
        quantized = self._quantized_input(x) if norm.use_triton else None
        if quantized is None:
            if residual is None:
                return self(norm(x)), x
            hidden, residual = norm(x, residual)
            return self(hidden), residual
        from sageinfer.ops.quantize_fused import rms_norm_quantize  # Triton only where kernels run
        rows = x.numel() // x.shape[-1]
        xq, x_scale, new_residual = rms_norm_quantize(x, norm.weight, norm.eps, *quantized, residual,
                                                      rows_out=self.quant.input_rows(self, rows))
        y = self._finish(self.quant.apply_quantized(self, xq, x_scale, x.dtype, rows))
        return y, x if new_residual is None else new_residual

    def _one_row_weight(self, x: torch.Tensor) -> dict | None:
        """The one-row kernel's weight arguments for x (ops/gemv.py), or None: x is not one row, or
        the quantization has no per-row form."""
        if not one_row(x, self.use_triton):
            return None
        if self.quant is None:
            return {"weight": self.weight}
        return getattr(self.quant, "one_row_args", lambda layer: None)(self)

    def fused_one_row(self, x: torch.Tensor) -> dict | None:
        """The one-row kernel's weight arguments where it may fold a norm, an activation or the
        residual add into this layer's matmul for x; None also where an all-reduce must come between
        the matmul and the rest."""
        return None if self.reduces else self._one_row_weight(x)

    def forward_gated(self, gate_up: torch.Tensor, act: nn.Module, residual: torch.Tensor | None = None):
        """self(act(gate_up)) for an MLP's down projection (act: SiLU-and-mul); one row fuses the activation
        into the matmul, and a layer that quantizes its input per row takes it from the activation kernel
        in 8 bits. With residual: adds the result to it in place and returns it."""
        fused = self.fused_one_row(gate_up)
        if fused is not None:
            return _gemv(gate_up, bias=self.bias, gated=True, residual=residual, **fused)
        quantized = self._quantized_input(gate_up) if act.use_triton else None
        if quantized is not None:  # the activation kernel writes this layer's 8-bit input
            from sageinfer.ops.quantize_fused import silu_and_mul_quantize  # Triton only where kernels run
            rows = gate_up.numel() // gate_up.shape[-1]
            xq, x_scale = silu_and_mul_quantize(gate_up, *quantized, rows_out=self.quant.input_rows(self, rows))
            y = self._finish(self.quant.apply_quantized(self, xq, x_scale, gate_up.dtype, rows))
            return y if residual is None else residual.add_(y)
        return self.add_into(act(gate_up), residual) if residual is not None else self.forward(act(gate_up))

    def forward_normed_activated(self, x: torch.Tensor, norm: nn.Module, act: nn.Module) -> torch.Tensor:
        """act(self(norm(x))) for an MLP's [gate, up] projection with a SiLU-and-mul act; one row
        normalises and activates inside the matmul."""
        fused = self.fused_one_row(x)
        if fused is not None:
            return _gemv(x, bias=self.bias, norm_weight=norm.weight, eps=norm.eps, activate=True, **fused)
        return act(self.forward_normed(x, norm))

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """self(norm(x)) for an RMSNorm; one row normalises inside the matmul (no norm launch)."""
        fused = self.fused_one_row(x)
        if fused is not None:
            return _gemv(x, bias=self.bias, norm_weight=norm.weight, eps=norm.eps, **fused)
        return self.forward(norm(x))

    def add_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += self(x), in place; returns residual."""
        fused = self.fused_one_row(x)
        if fused is not None:
            return _gemv(x, bias=self.bias, residual=residual, **fused)
        return residual.add_(self.forward(x))


def one_row(x: torch.Tensor, use_triton: bool) -> bool:
    """A single row (decode of one sequence) goes through the skinny Triton matmul, which streams the
    weights faster than the library GEMM there (benchmarks/experiments/tune_decode_step.py); the rest through torch."""
    return use_triton and x.dim() == 2 and x.shape[0] == 1


def _gemv(*args, **kwargs) -> torch.Tensor:
    from sageinfer.ops.gemv import gemv  # Triton only where a one-row path is taken
    return gemv(*args, **kwargs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_triton: bool,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight.T + bias, computed in the weight's dtype and returned as out_dtype (default: x's)."""
    if one_row(x, use_triton):
        return _gemv(x, weight, bias, out_dtype=out_dtype)
    y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


class MergedLinear(Linear):
    """Several projections of the same input in one matmul; shard_id picks the slice to load. Column
    parallel: each projection is split over the ranks, and a rank holds its part of each."""

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool = False, parallel: str | None = None):
        tp = get_tp_group()
        whole = dict(shard_sizes)
        if parallel == "column" and tp.size > 1:
            shard_sizes = {k: tp.split(v) for k, v in shard_sizes.items()}
        else:
            parallel = None
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.whole_shard_rows = whole
        self.split_shards = parallel == "column"
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size

    def whole_rows(self, shard_id=None) -> int:
        return sum(self.whole_shard_rows.values()) if shard_id is None else self.whole_shard_rows[shard_id]

    def _shard_part(self, shard_id, loaded: torch.Tensor) -> torch.Tensor:
        """This rank's part of one projection's whole checkpoint tensor."""
        size = self.shard_offsets[shard_id][1]
        return loaded.narrow(0, self.tp.rank * size, size) if self.split_shards else loaded

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            if self.tp.size > 1:
                raise ValueError("a fused checkpoint tensor cannot be split over tensor-parallel ranks yet")
            return super().weight_loader(param, loaded)
        loaded = self._shard_part(shard_id, loaded)
        offset, size = self.shard_offsets[shard_id]
        param = self._materialize(param)
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} does not match {tuple(target.shape)}")
        target.copy_(loaded)
        self._rows_arrived(param, size)


class QKVLinear(MergedLinear):
    """q, k and v projections; with tensor parallelism a rank holds its query heads and the KV heads
    they read (replicated when there are fewer KV heads than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp = get_tp_group()
        local_heads = tp.split(num_heads)
        first_kv, local_kv = kv_head_range(num_kv_heads, tp)
        super().__init__(hidden_size, {"q": local_heads * head_dim, "k": local_kv * head_dim,
                                       "v": local_kv * head_dim}, bias)
        self.q_size = local_heads * head_dim
        self.kv_size = local_kv * head_dim
        self.head_rows = {"q": tp.rank * self.q_size, "k": first_kv * head_dim, "v": first_kv * head_dim}
        self.whole_shard_rows = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}

    def _shard_part(self, shard_id, loaded: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return loaded
        return loaded.narrow(0, self.head_rows[shard_id], self.shard_offsets[shard_id][1])
