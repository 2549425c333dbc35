"""Decode steps as captured device graphs, one per batch size of a ladder (a batch pads up to the
next size). Inputs live in persistent buffers that each step overwrites in place; padded rows are
one-token sequences on the null block whose KV writes are skipped (slot -1)."""
from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from sageinfer.attention.backend import AttentionMetadata
from sageinfer.ops import launch

# Decode graphs of up to this many sequences, and all whole-prompt prefill graphs, launch their Triton
# kernels dependently (ops/launch.py); larger decode batches measured slightly slower with it.
DEPENDENT_LAUNCH_MAX_DECODE_BATCH = 16
# Decode batch sizes that have all of the attention backend's graph variants (DecodeGraphs).
VARIANT_SIZES_EVERY = 32

logger = logging.getLogger(__name__)


def capture(platform, pool, model, args: tuple):
    """Warm up (kernels compile outside the capture), then capture model(*args); (graph, output)."""
    model(*args)
    graph = platform.graph_class()()
    with platform.graph_context(graph, pool=pool):
        output = model(*args)
    return graph, output


def batch_size_of(key) -> int:
    """A ladder key's batch size: the key itself, or a tuple key's first element."""
    return key[0] if isinstance(key, tuple) else key


def capture_ladder(keys: list, make_meta, model, backend, platform, num_kv_heads: int, input_ids: torch.Tensor,
                   positions: torch.Tensor, kv_caches, dependent_launch_max: int = 0,
                   after_each=None) -> tuple[dict, dict, float]:
    """Capture one graph per key (a batch size, or a tuple that starts with one), largest batch first so
    smaller graphs reuse its memory. make_meta(key) -> AttentionMetadata built on buffers that outlive
    the graphs; after_each(key), if given, once a key's graph is captured. Returns (graphs, outputs,
    seconds), keyed alike."""
    graphs, outputs = {}, {}
    start = time.perf_counter()
    pool = platform.graph_pool_handle()
    dependent = platform.supports_dependent_launch() and backend.name == "triton"
    for key in sorted(keys, key=batch_size_of, reverse=True):
        size = batch_size_of(key)
        meta = make_meta(key)
        backend.plan(meta, num_kv_heads)
        with launch.dependent_launch(dependent and size <= dependent_launch_max):
            graphs[key], outputs[key] = capture(platform, pool, model,
                                                (input_ids[:size], positions[:size], kv_caches, meta))
        if after_each is not None:
            after_each(key)
    platform.synchronize()
    return graphs, outputs, time.perf_counter() - start


def graph_batch_sizes(max_num_seqs: int, max_graph_batch: int | None = 512) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then every 16 to 512 and every 32 beyond, up to
    max_graph_batch (None: no cap); the first of them that holds max_num_seqs ends the list (a batch pads up
    to the next size, so max_num_seqs = 20 runs in the graph of 32 rather than eagerly)."""
    sizes = []
    for size in itertools.chain((1, 2, 4, 8), range(16, 513, 16), itertools.count(544, 32)):
        if max_graph_batch is not None and size > max_graph_batch:
            break
        sizes.append(size)
        if size >= max_num_seqs:
            break
    return sizes


class DecodeGraphs:
    """capture_only(keys) -> the keys to capture, and after_each: for executor/graph_memory.py, which
    captures a few of the ladder's graphs to measure what all of them will hold (self.keys)."""

    def __init__(self, model, backend, platform, device, max_num_seqs: int, max_model_len: int,
                 block_size: int, num_kv_heads: int, kv_caches, max_graph_batch: int = 512, capture_only=None,
                 after_each=None):
        self.sizes = graph_batch_sizes(max_num_seqs, max_graph_batch)
        self.platform, self.device = platform, device
        self.max_batch = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        n = self.max_batch
        # Inputs that change every step sit in two packed buffers, each written by one host copy per
        # step: [token ids, positions, slots] (int64) and [seq lens, cascade prefix length] (int32).
        self.int64_inputs = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.int64_inputs
        self.slot_mapping.fill_(-1)
        self.int32_inputs = torch.ones(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = self.int32_inputs[:n]
        # Shared-prefix length for cascade decode; graphs whose backend plan keeps it read it each
        # replay (0 = no shared prefix this step).
        self.cascade_prefix_len = self.int32_inputs[n:]
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        metas: dict[tuple[int, int, bool], AttentionMetadata] = {}
        # A batch size may have several graphs, each planned for a longest context and with or without
        # a shared-prefix input (the backend's variants); a step replays the one the backend picks. Only
        # every VARIANT_SIZES_EVERY-th size (and the largest) has them all, each costing start-up a
        # capture; a step of a size between borrows the next one's, padded (up to 16 rows more).
        self.backend, self.num_kv_heads = backend, num_kv_heads
        planned = {bs: backend.decode_graph_variants(bs, num_kv_heads, max_model_len) for bs in self.sizes}
        self.variants = {bs: v if bs % VARIANT_SIZES_EVERY == 0 or bs == self.max_batch else v[-1:]
                         for bs, v in planned.items()}
        self.variant_size = {bs: next((s for s in self.sizes if s >= bs and len(self.variants[s]) == len(v)), bs)
                             for bs, v in planned.items() if len(v) > 1}

        def make_meta(key: tuple[int, int, bool]) -> AttentionMetadata:  # views of the persistent buffers above
            bs, max_seq_len, cascade = key
            meta = metas[key] = AttentionMetadata(
                num_actual_tokens=bs, slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
                seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs], max_query_len=1,
                max_seq_len=max_seq_len, query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[1] * bs,
                cascade_prefix_len=self.cascade_prefix_len if cascade else None)
            return meta
        keys = self.keys = [(bs, *variant) for bs in self.sizes for variant in self.variants[bs]]
        self.graphs, self.outputs, self.capture_seconds = capture_ladder(
            capture_only(keys) if capture_only else keys, make_meta, model, backend, platform, num_kv_heads,
            self.input_ids, self.positions, kv_caches, DEPENDENT_LAUNCH_MAX_DECODE_BATCH, after_each)
        # The backend's plan keeps the cascade input only where its kernels can merge a prefix.
        self.cascade_keys = {key for key, meta in metas.items() if meta.cascade_prefix_len is not None}
        logger.info("captured %d decode graphs (batch 1..%d) in %.1f s", len(self.graphs), n, self.capture_seconds)

    def can_run(self, num_seqs: int, max_query_len: int) -> bool:
        return max_query_len == 1 and num_seqs <= self.max_batch

    def run(self, host, fill_pending) -> torch.Tensor:
        """host: executor.model_runner.HostInputs of a decode-only batch; fill_pending(input_ids) writes
        tokens still on the device into the input buffer. Returns hidden [size, H]: the batch's num_seqs
        rows, then the captured size's padding rows (whatever they computed: rows of a matmul do not mix)."""
        num = host.num_tokens
        bs = next(s for s in self.sizes if s >= num)
        key = (bs, *self.variants[bs][-1])
        if bs in self.variant_size:
            variants = self.variants[self.variant_size[bs]]
            choice = self.backend.decode_graph_choice(variants, host.seq_lens, host.cascade_prefix_len,
                                                      self.num_kv_heads)
            if choice != len(variants) - 1:
                key = (self.variant_size[bs], *variants[choice])
        n = self.max_batch
        int64_inputs = np.zeros((3, n), dtype=np.int64)
        int64_inputs[0, :num], int64_inputs[1, :num] = host.input_ids, host.positions
        int64_inputs[2, :num], int64_inputs[2, num:] = host.slot_mapping, -1
        int32_inputs = np.ones(n + 1, dtype=np.int32)
        int32_inputs[:num], int32_inputs[n] = host.seq_lens, host.cascade_prefix_len if key in self.cascade_keys else 0
        self.platform.copy_to_device(self.int64_inputs, int64_inputs)
        fill_pending(self.input_ids)
        self.platform.copy_to_device(self.int32_inputs, int32_inputs)
        self.platform.copy_to_device(self.block_table[:num, :host.block_table.shape[1]], host.block_table)
        self.graphs[key].replay()
        return self.outputs[key][:bs]


def prefill_buckets(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    limit = min(max_num_batched_tokens, max_model_len, 2048)
    return [b for b in (64, 128, 256, 512, 1024, 2048) if b <= limit]


class PrefillGraphs:
    """Whole-prompt prefill of one sequence with no cached context, as captured graphs per token
    bucket. A short prompt's eager prefill is bound by the host launching ~10 kernels per layer;
    replaying a graph makes time to first token the device's time. The prompt is padded up to the
    bucket: padded rows come after the real ones, so causality keeps them out of the real rows, and
    their KV writes are skipped (slot -1). capture_only, after_each: as DecodeGraphs takes them."""

    def __init__(self, model, backend, platform, device, max_num_batched_tokens: int, max_model_len: int,
                 block_size: int, num_kv_heads: int, kv_caches, capture_only=None, after_each=None):
        self.sizes = self.keys = prefill_buckets(max_num_batched_tokens, max_model_len)
        self.platform, self.device = platform, device
        n = self.sizes[-1] if self.sizes else 0
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(1, max_blocks, dtype=torch.int32, device=device)
        # A graph reads its inputs at fixed addresses: every tensor it was captured with must live
        # as long as it does (the per-bucket query_start_loc / seq_lens included).
        self.metas: dict[int, AttentionMetadata] = {}

        def make_meta(bs: int) -> AttentionMetadata:
            meta = self.metas[bs] = AttentionMetadata(
                num_actual_tokens=bs, slot_mapping=self.slot_mapping[:bs],
                query_start_loc=torch.tensor([0, bs], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([bs], dtype=torch.int32, device=device), block_table=self.block_table,
                max_query_len=bs, max_seq_len=bs, query_start_loc_cpu=[0, bs], seq_lens_cpu=[bs])
            return meta
        self.graphs, self.outputs, self.capture_seconds = capture_ladder(
            capture_only(self.sizes) if capture_only else self.sizes, make_meta, model, backend, platform,
            num_kv_heads, self.input_ids, self.positions, kv_caches, max(self.sizes, default=0), after_each)
        logger.info("captured %d prefill graphs (up to %d tokens) in %.1f s", len(self.graphs), n, self.capture_seconds)

    def can_run(self, scheduled: list, host) -> bool:
        if len(scheduled) != 1 or not self.sizes:
            return False
        request, num_new = scheduled[0]
        return request.num_computed_tokens == 0 and 1 < num_new <= self.sizes[-1] and not len(host.fill_index)

    def run(self, host) -> torch.Tensor:
        num = host.num_tokens
        bs = next(s for s in self.sizes if s >= num)
        pad = bs - num
        copy = self.platform.copy_to_device
        copy(self.input_ids[:bs], np.pad(host.input_ids, (0, pad)))
        copy(self.positions[:bs], np.pad(host.positions, (0, pad)))
        copy(self.slot_mapping[:bs], np.pad(host.slot_mapping, (0, pad), constant_values=-1))
        copy(self.block_table[:, :host.block_table.shape[1]], host.block_table)
        self.graphs[bs].replay()
        return self.outputs[bs][:num]
