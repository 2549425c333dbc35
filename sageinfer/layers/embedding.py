"""Token embedding and LM head, split over the tensor-parallel ranks by vocabulary rows; an LM head that
the checkpoint quantizes is a column-parallel linear layer of its method."""
import torch
from torch import nn
import torch.nn.functional as F

from sageinfer.distributed.parallel_state import get_tp_group
from sageinfer.layers.linear import Linear, linear


class _VocabRows(nn.Module):
    """A [vocab, hidden] table; with tensor parallelism each rank holds ceil(vocab / ranks) rows
    (the last rank's tail is padding, zero)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.size)
        self.first_row = self.tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {(self.vocab_size, param.shape[1])}")
        part = loaded[self.first_row:self.first_row + self.rows_per_rank]
        param.data[:part.shape[0]].copy_(part)
        param.data[part.shape[0]:].zero_()


class VocabEmbedding(_VocabRows):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.first_row
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))  # each id lives on one rank


class LMHead(_VocabRows):
    """Logits in float32, for the sampler's softmax and logprobs; each rank computes its vocabulary
    rows and all ranks gather the whole row of logits."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.use_triton = False  # set by the model runner from the platform's kernel choice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, None, self.use_triton, out_dtype=torch.float32)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last_dim(logits)[..., :self.vocab_size]


class QuantizedLMHead(Linear):
    """The LM head as a quantized checkpoint holds it (GPTQ's lm_head: true, a compressed-tensors recipe
    that does not ignore it): the layer's method over [vocab, hidden], vocabulary rows split over the
    ranks (evenly), logits in float32 gathered whole."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(hidden_size, vocab_size, parallel="column")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._matmul(hidden).float()
        return logits if self.tp.size == 1 else self.tp.all_gather_last_dim(logits)
