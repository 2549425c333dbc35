import torch
from torch import nn
import torch.nn.functional as F


class SiluAndMul(nn.Module):
    """silu(gate) * up over the concatenated [gate, up] projection."""

    def __init__(self):
        super().__init__()
        self.use_triton = False  # set by the model runner from the platform's kernel choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from sageinfer.ops.activation import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
