"""Decode steps as captured device graphs, one per batch size of a ladder (a batch pads up to the
next size). Inputs live in persistent buffers that each step overwrites in place; padded rows are
one-token sequences on the null block whose KV writes are skipped (slot -1)."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from sageinfer.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 513, 16))
    return [s for s in sizes if s <= max(max_num_seqs, 1)] or [1]


class DecodeGraphs:
    def __init__(self, model, backend, platform, device, max_num_seqs: int, max_model_len: int,
                 block_size: int, num_kv_heads: int, kv_caches):
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.platform, self.device = platform, device
        self.max_batch = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        pool = platform.graph_pool_handle()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = AttentionMetadata(
                num_actual_tokens=bs, slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs], max_query_len=1,
                max_seq_len=max_model_len, query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs)
            backend.plan(meta, num_kv_heads)
            args = (self.input_ids[:bs], self.positions[:bs], kv_caches, meta)
            model(*args)  # warm-up: compiles kernels outside the capture
            graph = platform.graph_class()()
            with platform.graph_context(graph, pool=pool):
                self.outputs[bs] = model(*args)
            self.graphs[bs] = graph
        platform.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode graphs (batch 1..%d) in %.1f s", len(self.sizes), n, self.capture_seconds)

    def can_run(self, num_seqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.max_batch

    def run(self, host, fill_pending) -> torch.Tensor:
        """host: executor.model_runner.HostInputs of a decode-only batch; fill_pending(input_ids) writes
        tokens still on the device into the input buffer. Returns hidden [num_seqs, H]."""
        num = host.num_tokens
        bs = next(s for s in self.sizes if s >= num)
        pad = bs - num
        to_device = self.platform.to_device
        self.input_ids[:bs].copy_(to_device(np.pad(host.input_ids, (0, pad)), self.device), non_blocking=True)
        fill_pending(self.input_ids)
        self.positions[:bs].copy_(to_device(np.pad(host.positions, (0, pad)), self.device), non_blocking=True)
        self.slot_mapping[:bs].copy_(to_device(np.pad(host.slot_mapping, (0, pad), constant_values=-1), self.device),
                                     non_blocking=True)
        self.seq_lens[:bs].copy_(to_device(np.pad(host.seq_lens.astype(np.int32), (0, pad), constant_values=1),
                                           self.device), non_blocking=True)
        width = host.block_table.shape[1]
        self.block_table[:num, :width].copy_(to_device(host.block_table, self.device), non_blocking=True)
        self.graphs[bs].replay()
        return self.outputs[bs][:num]
