"""Linear layers that own their weight loading (stacked q/k/v and gate/up shards).

Weights are created uninitialised (torch.empty): the loader fills them, so building an 8B model
costs no init time and no second copy.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.use_triton = False  # set by the model runner from the platform's kernel choice

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.use_triton)

    def forward_gated(self, gate_up: torch.Tensor, act: nn.Module, residual: torch.Tensor | None = None):
        """self(act(gate_up)) for an MLP's down projection; one row fuses the activation in.
        With residual: adds the result to it in place and returns it."""
        if one_row(gate_up, self.use_triton):
            return _gemv(gate_up, self.weight, self.bias, gated=True, residual=residual)
        return self.add_into(act(gate_up), residual) if residual is not None else self.forward(act(gate_up))

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """self(norm(x)) for an RMSNorm; one row normalises inside the matmul (no norm launch)."""
        if one_row(x, self.use_triton):
            return _gemv(x, self.weight, self.bias, norm_weight=norm.weight, eps=norm.eps)
        return self.forward(norm(x))

    def add_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += self(x), in place; returns residual."""
        if one_row(x, self.use_triton):
            return _gemv(x, self.weight, self.bias, residual=residual)
        return residual.add_(self.forward(x))


def one_row(x: torch.Tensor, use_triton: bool) -> bool:
    """A single row (decode of one sequence) goes through the skinny Triton matmul, which streams the
    weights faster than the library GEMM there (benchmarks/tune_decode_step.py); the rest through torch."""
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
    """Several projections of the same input in one matmul; shard_id picks the slice to load."""

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded)
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id!r}: weight shape {tuple(loaded.shape)} does not match {tuple(target.shape)}")
        target.copy_(loaded)


class QKVLinear(MergedLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias)
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
