import torch
from torch import nn
import torch.nn.functional as F


class SiluAndMul(nn.Module):
    """silu(gate) * up over the concatenated [gate, up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
