"""Attention backend interface over a paged KV cache.

KV cache layout, per layer: k_cache and v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token's slot is block_id * block_size + offset. One head's vectors of a block are
block_size rows of head_dim contiguous elements, so a kernel reads a block for all query heads of
a KV group with unit-stride loads.

A batch is flat: the new tokens of every sequence back to back (prefill chunks and decodes mixed).
Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1]; its context is seq_lens[i]
tokens, the new ones last, so new token j sits at position seq_lens[i] - query_len + j.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


KV_CACHE_DTYPES = ("auto", "fp8", "int8")
# Kernel-side code of each cache dtype (a Triton constexpr).
KV_MODE = {"auto": 0, "fp8": 1, "int8": 2}


def new_kv_scales(num_blocks: int, block_size: int, num_kv_heads: int, device) -> torch.Tensor:
    """An INT8 cache's scales, indexed [blocks, block_size, KV heads] but stored head-major (a
    transposed view of [blocks, KV heads, block_size]): a decode tile's 64 keys of one head then read
    256 contiguous bytes, not 64 values 4 bytes each in 32-byte sectors of their own (8 KV heads)."""
    return torch.zeros(num_blocks, num_kv_heads, block_size, dtype=torch.float32, device=device).transpose(1, 2)


@dataclass
class LayerKVCache:
    """One layer's paged KV cache. auto: the model dtype. fp8: e4m3 values times one per-tensor
    scale. int8: symmetric int8 with a float32 scale per (token, kv head), in k_scale / v_scale
    indexed [num_blocks, block_size, num_kv_heads] (stored as new_kv_scales makes them, or
    contiguous: the kernels take either)."""
    k: torch.Tensor
    v: torch.Tensor
    dtype: str = "auto"
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    fp8_scale: float = 1.0

    @property
    def mode(self) -> int:
        return KV_MODE[self.dtype]


@dataclass
class AttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor      # [num_tokens] int64; -1 for padding (not written)
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor          # [num_seqs] int32
    block_table: torch.Tensor       # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop on the host (the reference) and for launch sizing.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    num_splits: int = 1             # split-KV factor for decode batches (Triton backend)
    min_split_keys: int = 0         # ... each split at least this many keys (0: every sequence cut in num_splits)
    wide_decode: bool = False       # a decode batch of one split whose programs fill every SM many times over
    # Cascade decode: tokens at the start of every sequence held in the same blocks (those of row 0
    # of block_table), as an int32 device tensor [1]; None when the step does not use it.
    cascade_prefix_len: torch.Tensor | None = None
    # The host's block table (numpy), where the step was built from one (eager steps): a backend may plan
    # on it without reading the device's.
    block_table_cpu: Any = None
    # The step's pages packed for a backend that copies them (the cache pages to copy, a table over the
    # copies); filled by the backend on first use in a step.
    packed_pages: tuple[torch.Tensor, torch.Tensor] | None = None
    # A mixed step cut in two for a backend that attends the single-token sequences (decodes, leading
    # the batch) with its decode kernel and the rest with its prefill kernel: (decode part, rest).
    parts: tuple["AttentionMetadata", "AttentionMetadata"] | None = None
    # Called by the model with each layer's index once that layer's kernels are enqueued (eager steps
    # only): a KV connector's copies of the layer's new KV start behind them.
    after_layer: Callable[[int], None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    def leading_single_token_seqs(self) -> int:
        """How many sequences at the start of the batch have one new token."""
        qsl = self.query_start_loc_cpu
        n = 0
        while n < self.num_seqs and qsl[n + 1] - qsl[n] == 1:
            n += 1
        return n

    def split_at(self, n: int) -> tuple["AttentionMetadata", "AttentionMetadata"]:
        """Sequences [0, n) and [n, num_seqs) as batches of their own; their query rows are rows
        [0, t) and [t, num_actual_tokens) of this batch's, t = query_start_loc_cpu[n]."""
        qsl, t = self.query_start_loc_cpu, self.query_start_loc_cpu[n]

        def part(lo: int, hi: int, rebase: int) -> AttentionMetadata:
            starts = qsl[lo:hi + 1]
            loc = self.query_start_loc[lo:hi + 1]
            return AttentionMetadata(
                num_actual_tokens=starts[-1] - starts[0], slot_mapping=self.slot_mapping[starts[0]:starts[-1]],
                query_start_loc=loc - rebase if rebase else loc, seq_lens=self.seq_lens[lo:hi],
                block_table=self.block_table[lo:hi],
                max_query_len=max(b - a for a, b in zip(starts, starts[1:])),
                max_seq_len=max(self.seq_lens_cpu[lo:hi]), query_start_loc_cpu=[x - rebase for x in starts],
                seq_lens_cpu=self.seq_lens_cpu[lo:hi],
                block_table_cpu=None if self.block_table_cpu is None else self.block_table_cpu[lo:hi])
        return part(0, n, 0), part(n, self.num_seqs, t)


class AttentionBackend:
    name = "base"
    graph_capturable = True  # its forward may be captured in a device graph

    def forward(self, layer, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        """Apply the layer's q/k norm and rotary, write k/v of the new tokens into the cache, then
        attend causally over the cache. layer: layers.attention.Attention. Returns [T, Hq, D]."""
        raise NotImplementedError

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:
        """Fill backend-specific launch choices into meta (once per step, on the host)."""

    def cascade_prefix_tokens(self, block_table, seq_lens, block_size: int, max_query_len: int) -> int:
        """How many leading tokens, shared by every sequence of a step (numpy block table and
        sequence lengths), to attend once for all; 0 if the backend would not use a shared prefix."""
        return 0

    def decode_graph_variants(self, num_seqs: int, num_kv_heads: int, max_model_len: int) -> list[tuple[int, bool]]:
        """The decode graphs of num_seqs sequences, one per (longest context planned for, whether a shared
        prefix input is offered to the plan): a graph's launch plan is fixed at capture, so a backend whose
        best plan depends on the step's lengths has several. The last is planned for max_model_len."""
        return [(max_model_len, True)]

    def decode_graph_choice(self, variants: list[tuple[int, bool]], seq_lens, cascade_prefix_len: int,
                            num_kv_heads: int) -> int:
        """Which of decode_graph_variants' graphs runs a step of these context lengths (numpy) and
        shared prefix (cascade_prefix_tokens')."""
        return len(variants) - 1


def get_attention_backend(name: str, platform=None) -> AttentionBackend:
    if name == "torch_ref":
        from sageinfer.attention.torch_ref import TorchRefBackend
        return TorchRefBackend()
    if name == "triton":
        from sageinfer.attention.triton_backend import TritonBackend
        if platform is None:
            return TritonBackend()
        return TritonBackend(num_sms=platform.num_compute_units(), tensor_copies=platform.supports_tensor_copies(),
                             platform_prefill=platform.prefill_attention())
    raise ValueError(f"attention backend must be 'torch_ref' or 'triton', got {name!r}")
