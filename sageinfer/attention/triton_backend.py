"""Triton backend: fused norm/rotary/cache write, then one paged-attention launch for the batch."""
from __future__ import annotations

import os

import numpy as np
import torch

from sageinfer.attention.backend import AttentionBackend, AttentionMetadata
from sageinfer.ops.cascade_attention import PREFIX_ALIGN, common_prefix_blocks, prefix_attention, prefix_splits
from sageinfer.ops import prefill_attention as tile_prefill
from sageinfer.ops.paged_attention import (LONG_CONTEXT, LONG_DECODE_KEYS, LONG_DECODE_SPLITS, WIDE_DECODE_CONFIGS,
                                           choose_num_splits, paged_attention, rotary_inside_supported)
from sageinfer.ops.rope_cache import rope_and_cache
from sageinfer.ops.widen_pages import widen_pages

# Cascade decode pays once a step has enough sequences reading a long enough common prefix.
CASCADE_MIN_SEQS = 16
CASCADE_MIN_PREFIX = 256
# Decode steps rotate q/k and write the new k/v inside the attention kernel: one launch per layer fewer.
# Single-stream Qwen3-8B on an H100: 6.02 -> 5.87 ms per token with the norms folded into the matmuls too
# (benchmarks/experiments/probe_single_stream.py). With cascade, the prefix kernel rotates the query rows it
# reads too.
ROTARY_IN_DECODE_ATTENTION = True


# Decode batches large enough to fill the GPU without split-KV still wait on their longest sequence,
# whose keys one program per KV head walks alone. Such batches are split in up to
# SAGEINFER_RAGGED_DECODE_SPLITS splits (0: none) of at least SAGEINFER_RAGGED_MIN_KEYS keys: short
# sequences keep one split, long ones are spread (H200, chat-mix second pass: 25,490 -> 28,022 tok/s; decode
# graphs of <= 64 sequences 14.6 -> 8.8 ms). Where it applies, a decode graph gives up cascade
# attention (its kernel merges a shared prefix only without splits).
RAGGED_DECODE_SPLITS = int(os.environ.get("SAGEINFER_RAGGED_DECODE_SPLITS", "8"))
RAGGED_MIN_KEYS = int(os.environ.get("SAGEINFER_RAGGED_MIN_KEYS", "1024"))
# A decode graph is planned for max_model_len, so every step of a large batch took the ragged splits. Such
# batch sizes also get a graph with one split, run when the step's lengths are even (the longest under
# RAGGED_MIN_SKEW times the mean) and its programs fill the GPU: there the splits only multiplied the
# programs by 8 and added a merge, and dropped cascade attention (H200, FP8 W+KV, 256 sequences at ~690
# keys: attention 6.70 -> 4.98 ms a step, the step 12.5 -> 10.8 ms). SAGEINFER_EVEN_DECODE_GRAPHS: 0 none,
# 1 one such graph (it offers a shared-prefix input; a step without a prefix gives it length 0), 2 two
# (without and with the prefix input: no rotary kernel and empty prefix launch for steps without one, at
# the cost of more graphs to capture at start-up). Eager decode steps and a mixed step's decodes, whose
# lengths the plan sees, take one split by the same rule (not timed on its own; 0 turns it off too).
EVEN_DECODE_GRAPHS = int(os.environ.get("SAGEINFER_EVEN_DECODE_GRAPHS", "1"))
RAGGED_MIN_SKEW = float(os.environ.get("SAGEINFER_RAGGED_MIN_SKEW", "2"))
# Decode programs an SM holds at once (ops/paged_attention.DECODE_CONFIG on sm_90: registers allow 4).
DECODE_PROGRAMS_PER_SM = 4
# A decode batch of one split with this many programs (sequences x KV heads) an SM or more is wide: its
# cache's kernel may take narrower tiles of fewer warps (ops/paged_attention.WIDE_DECODE_CONFIGS). On an
# H200 those tiles lost at 3.9 programs an SM and gained at 15.5; 8 lies between, not swept
# (benchmarks/experiments/probe_quantized_decode.py --cases). SAGEINFER_WIDE_DECODE_PROGRAMS_PER_SM moves
# the bound; 0: no batch is wide.
WIDE_DECODE_PROGRAMS_PER_SM = int(os.environ.get("SAGEINFER_WIDE_DECODE_PROGRAMS_PER_SM", "8"))
# The least keys of a split in a plan of LONG_DECODE_SPLITS (made for a sequence of LONG_DECODE_KEYS or
# more, which a graph does for every step when max_model_len is that long): one key tile, so a short
# sequence is cut as the plan of 32 cut it (one tile a split) and the merge reads only the splits it
# used. 512 gave a 32K sequence the same 64 splits but cut L1's 1.3K keys in 3, too few programs
# (H200, L1 TPOT 4.83 -> 5.25 ms bf16, 4.86 -> 5.47 FP8).
LONG_DECODE_MIN_KEYS = int(os.environ.get("SAGEINFER_LONG_DECODE_MIN_KEYS", "64"))


# Widened copies of a quantized cache's pages are made for prefills whose sequences read at most this many
# distinct context tokens in the step (Qwen3-8B shapes: 256 MB per layer at 64K tokens, freed after the layer).
WIDEN_MAX_TOKENS = 65536
# The platform's prefill kernel (Hopper's warp-specialised one) serves long prompts, and also steps with at
# least this many new tokens in their prefills (0: long prompts only). H200, a layer of Qwen3-8B shapes
# (benchmarks/experiments/probe_fp8_prefill.py), the platform's kernel against the portable one, bf16 cache:
# 16 new prompts of 1,024: 364 against 473 us; 75 prompts of 200 after a shared 2,000: 1,255 against 1,684.
# Each launch encodes two tensor maps on the host (46-87 us), which a step of this many tokens hides
# behind its GPU work.
PLATFORM_PREFILL_MIN_TOKENS = int(os.environ.get("SAGEINFER_PLATFORM_PREFILL_MIN_TOKENS", "4096"))


def many_new_tokens(num_tokens: int) -> bool:
    """Whether a step's prefills hold enough new tokens for the platform's prefill kernel (long prompts aside)."""
    return 0 < PLATFORM_PREFILL_MIN_TOKENS <= num_tokens


def packed_pages(meta, page_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache pages that the step's sequences read and a block table over their copies: (page ids [P]
    int64, table [seqs, pages] int32), on the device, built once a step. From the host's block table
    each page is taken once, however many sequences read it (a shared prefix is copied once); without
    one, every sequence's pages apart."""
    if meta.packed_pages is None:
        counts = np.array([-(-n // page_size) for n in meta.seq_lens_cpu])
        width = int(counts.max())
        if meta.block_table_cpu is not None:
            table = np.asarray(meta.block_table_cpu)[:, :width]
            used = np.arange(width)[None, :] < counts[:, None]
            pages, inverse = np.unique(table[used], return_inverse=True)
            packed = np.zeros(table.shape, dtype=np.int32)
            packed[used] = inverse
            meta.packed_pages = (torch.from_numpy(pages.astype(np.int64)).to(device),
                                 torch.from_numpy(packed).to(device))
        else:
            counts = torch.from_numpy(counts)
            starts = torch.cumsum(counts, 0) - counts
            within = torch.arange(int(counts.sum())) - torch.repeat_interleave(starts, counts)
            rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
            table = torch.zeros(len(counts), width, dtype=torch.int32)
            table[rows, within] = torch.arange(int(counts.sum()), dtype=torch.int32)
            index = (rows * meta.block_table.shape[1] + within).to(device)
            meta.packed_pages = (meta.block_table.reshape(-1)[index].long(), table.to(device))
    return meta.packed_pages


def widened_pages(cache, meta, dtype):
    """The pages that the step's sequences read (packed_pages), copied out of an FP8 or INT8 cache into
    `dtype` (times the cache's scales): (keys, values, a block table over them)."""
    pages, table = packed_pages(meta, cache.k.shape[1], cache.k.device)
    return (widen_pages(cache.k, pages, dtype, cache.fp8_scale, cache.k_scale),
            widen_pages(cache.v, pages, dtype, cache.fp8_scale, cache.v_scale), table)


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_sms: int | None = None, tensor_copies: bool = False, platform_prefill=None):
        if num_sms is None:  # the current platform's (an H100 has 132 SMs)
            from sageinfer.platforms import get_platform
            num_sms = get_platform().num_compute_units()
        self.num_sms = num_sms
        self.tensor_copies = tensor_copies  # the platform has a tensor copy engine
        # the platform's own prefill kernel, if any (long prompts, and steps of PLATFORM_PREFILL_MIN_TOKENS)
        self.platform_prefill = platform_prefill

    def plan(self, meta: AttentionMetadata, num_kv_heads: int) -> None:
        if meta.max_query_len == 1:
            meta.num_splits = choose_num_splits(meta.num_seqs, num_kv_heads, meta.max_seq_len, self.num_sms)
            if (self._takes_ragged_splits(meta.num_splits, meta.max_seq_len)
                    and not self._known_and_even(meta, num_kv_heads)):
                meta.num_splits, meta.min_split_keys = RAGGED_DECODE_SPLITS, RAGGED_MIN_KEYS
            elif meta.max_seq_len >= LONG_DECODE_KEYS and meta.num_splits == LONG_DECODE_SPLITS:
                # Planned for a sequence of LONG_DECODE_KEYS or more (a graph plans for max_model_len):
                # shorter sequences of the batch keep splits of LONG_DECODE_MIN_KEYS or more, not 64
                # tiny ones to merge.
                meta.min_split_keys = LONG_DECODE_MIN_KEYS
            meta.wide_decode = (meta.num_splits == 1 and WIDE_DECODE_PROGRAMS_PER_SM > 0
                                and meta.num_seqs * num_kv_heads >= WIDE_DECODE_PROGRAMS_PER_SM * self.num_sms)
        if meta.max_query_len != 1 or meta.num_splits != 1:
            meta.cascade_prefix_len = None  # the merge lives in the one-split decode kernel
        if meta.max_query_len > 1 and meta.parts is None:
            # A mixed step's decodes (the runner puts them first) go to the decode kernel: in a prefill
            # kernel each takes a query tile of its own for one row (H200, chat-mix: the Hopper prefill
            # kernel was half of the GPU time of its mixed steps).
            decodes = meta.leading_single_token_seqs()
            if 0 < decodes < meta.num_seqs:
                meta.parts = meta.split_at(decodes)
                self.plan(meta.parts[0], num_kv_heads)

    @staticmethod
    def _takes_ragged_splits(num_splits: int, max_seq_len: int) -> bool:
        return RAGGED_DECODE_SPLITS > 1 and num_splits == 1 and max_seq_len > RAGGED_MIN_KEYS

    def decode_graph_variants(self, num_seqs, num_kv_heads, max_model_len):
        if EVEN_DECODE_GRAPHS and self._takes_ragged_splits(
                choose_num_splits(num_seqs, num_kv_heads, max_model_len, self.num_sms), max_model_len):
            # Planned for RAGGED_MIN_KEYS: one split (the prefix input kept where offered), then the ragged
            # splits (which drop it).
            one_split = [(RAGGED_MIN_KEYS, False)] if EVEN_DECODE_GRAPHS >= 2 else []
            return one_split + [(RAGGED_MIN_KEYS, True), (max_model_len, True)]
        return [(max_model_len, True)]

    def _one_split_pays(self, seq_lens: np.ndarray, num_kv_heads: int) -> bool:
        """Whether one split serves a decode batch of these lengths at least as well as the ragged splits:
        no sequence past RAGGED_MIN_KEYS, or even lengths whose programs fill the GPU."""
        longest = int(seq_lens.max())
        fills_gpu = len(seq_lens) * num_kv_heads >= DECODE_PROGRAMS_PER_SM * self.num_sms
        return longest <= RAGGED_MIN_KEYS or (fills_gpu and longest < RAGGED_MIN_SKEW * float(seq_lens.mean()))

    def _known_and_even(self, meta: AttentionMetadata, num_kv_heads: int) -> bool:
        """An eager decode step or a mixed step's decodes (their lengths are the batch's; a graph's are
        placeholders below the max_seq_len it is planned for) that one split serves (_one_split_pays)."""
        if not EVEN_DECODE_GRAPHS or not meta.seq_lens_cpu:
            return False
        lengths = np.asarray(meta.seq_lens_cpu)
        return int(lengths.max()) == meta.max_seq_len and self._one_split_pays(lengths, num_kv_heads)

    def decode_graph_choice(self, variants, seq_lens, cascade_prefix_len, num_kv_heads):
        if len(variants) == 1:
            return 0
        if not self._one_split_pays(seq_lens, num_kv_heads):
            return len(variants) - 1
        # One split: the graph whose prefix input matches the step's, else one that takes length 0.
        matching = [i for i, (_, cascade) in enumerate(variants[:-1]) if cascade == bool(cascade_prefix_len)]
        return matching[0] if matching else next(i for i, (_, cascade) in enumerate(variants[:-1]) if cascade)

    def cascade_prefix_tokens(self, block_table, seq_lens, block_size, max_query_len):
        if max_query_len != 1 or len(seq_lens) < CASCADE_MIN_SEQS:
            return 0
        tokens = common_prefix_blocks(block_table, seq_lens, block_size) * block_size // PREFIX_ALIGN * PREFIX_ALIGN
        return tokens if tokens >= CASCADE_MIN_PREFIX else 0

    @staticmethod
    def _platform_prefill_pays(meta: AttentionMetadata) -> bool:
        """Long prompts, and eager steps (those with the host's block table: never inside a graph's
        capture, where the host's work would be baked in) of PLATFORM_PREFILL_MIN_TOKENS new tokens."""
        return meta.max_seq_len >= LONG_CONTEXT or (meta.block_table_cpu is not None
                                                     and many_new_tokens(meta.num_actual_tokens))

    def _platform_prefill(self, q, cache, out, meta, scale):
        """The platform's prefill kernel (H100, 16K chunks of a 32K prompt: 613-654 against 460-487
        TFLOP/s for the portable kernel). It reads 16-bit pages: an FP8 or INT8 cache's pages of the step
        are widened first, when they are few enough (H200, a 16K chunk after 16K cached tokens: the
        portable kernel reading FP8 took 332 ms of attention against 135 for this kernel on 16-bit pages;
        widening costs one copy per layer; INT8 widened the same way, not timed)."""
        k_cache, v_cache, block_table = cache.k, cache.v, meta.block_table
        if cache.mode in (1, 2):
            pages, _ = packed_pages(meta, cache.k.shape[1], cache.k.device)
            if pages.numel() * cache.k.shape[1] > WIDEN_MAX_TOKENS:
                return None
            k_cache, v_cache, block_table = widened_pages(cache, meta, q.dtype)
        elif cache.k.dtype != q.dtype:
            return None
        return self.platform_prefill(q, k_cache, v_cache, out, block_table, meta.seq_lens, meta.query_start_loc,
                                     meta.num_seqs, meta.max_query_len, scale)

    def forward(self, layer, positions, q, k, v, cache, meta):
        q_norm = layer.q_norm.weight if layer.q_norm is not None else None
        k_norm = layer.k_norm.weight if layer.k_norm is not None else None
        eps = layer.q_norm.eps if layer.q_norm is not None else 0.0
        num_tokens = meta.num_actual_tokens
        q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        rope = None
        if ROTARY_IN_DECODE_ATTENTION and meta.max_query_len == 1 and rotary_inside_supported(q, cache.k):
            rope = (positions[:num_tokens], k, v, layer.rotary_emb.cos_sin_cache, meta.slot_mapping, q_norm, k_norm,
                    eps)
        else:
            rope_and_cache(positions[:num_tokens], q, k, v, layer.rotary_emb.cos_sin_cache, cache.k, cache.v,
                           meta.slot_mapping, q_norm, k_norm, eps, cache.k_scale, cache.v_scale, cache.mode,
                           cache.fp8_scale)
        if meta.parts is not None:
            decodes = meta.parts[0].num_actual_tokens
            for part, rows in zip(meta.parts, (slice(0, decodes), slice(decodes, num_tokens))):
                self._attend(layer, q[rows], out[rows], cache, part, None)
            return out
        return self._attend(layer, q, out, cache, meta, rope)

    def _attend(self, layer, q, out, cache, meta, rope):
        """Attention of a batch whose new keys and values are in the cache (or, with rope, are written
        by the decode kernel)."""
        num_tokens = q.shape[0]
        if meta.max_query_len > 1:
            page_size, head_dim = cache.k.shape[1], q.shape[2]
            if (self._platform_prefill_pays(meta) and self.platform_prefill is not None
                    and self.platform_prefill.supports(page_size, head_dim, q.shape[1], cache.k.shape[2], q.dtype)):
                done = self._platform_prefill(q, cache, out, meta, layer.scale)
                if done is not None:
                    return done
            if tile_prefill.supports(page_size, head_dim, cache.k.dtype):
                # Pages of whole key tiles: one contiguous run of cache rows per tile (H100: 455-473 against
                # 399-414 TFLOP/s for the per-key gather on the 16K chunks of a 32K prompt).
                return tile_prefill.prefill_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens,
                                                      meta.query_start_loc, meta.num_seqs, meta.max_query_len,
                                                      layer.scale, max_seq_len=meta.max_seq_len,
                                                      tensor_copies=self.tensor_copies, kv_scale=cache.fp8_scale,
                                                      k_scale=cache.k_scale, v_scale=cache.v_scale)
        prefix = None
        if meta.cascade_prefix_len is not None:
            num_kv_heads = cache.k.shape[2]
            splits = prefix_splits(num_tokens, q.shape[1] // num_kv_heads, num_kv_heads, self.num_sms)
            prefix_rope = None
            if rope is not None:  # the query's part: the decode kernel writes the new keys
                positions, _, _, cos_sin, _, q_norm, _, eps = rope
                prefix_rope = (positions, cos_sin, q_norm, eps)
            prefix = (*prefix_attention(q, cache.k, cache.v, meta.block_table[0], meta.cascade_prefix_len,
                                        layer.scale, splits, k_scale=cache.k_scale, v_scale=cache.v_scale,
                                        kv_mode=cache.mode, fp8_scale=cache.fp8_scale, rope=prefix_rope),
                      meta.cascade_prefix_len)
        config = WIDE_DECODE_CONFIGS.get(cache.mode) if meta.max_query_len == 1 and meta.wide_decode else None
        return paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                               meta.num_seqs, meta.max_query_len, layer.scale, meta.num_splits, config=config,
                               max_seq_len=meta.max_seq_len, k_scale=cache.k_scale, v_scale=cache.v_scale,
                               kv_mode=cache.mode, fp8_scale=cache.fp8_scale, prefix=prefix, rope=rope,
                               min_split_keys=meta.min_split_keys)
