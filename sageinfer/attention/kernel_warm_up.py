"""Compile, before serving and from several threads at once, the attention kernels' variants: the
Triton backend's decode launches of the graphs about to be captured, of a mixed step's decodes
(attended apart from its prefill chunks) and of eager decode batches larger than the largest graph.
A launch that compiles in the middle of serving stalls it: on an H200 a first pass of a
conversation-like mix paid 1.6 s for one such variant, a second pass another 1.7 s for two more; the
graph capture compiles its own one at a time. Plans that split share one attention compile (the split
count and least split are arguments); each split count has a merge of its own.

One launch per variant, of one sequence through one layer's cache, writing nothing to the cache (its
slot is -1); kernels already compiled cost a launch only. A plan is (num_splits, min_split_keys,
whole_step, dependent, wide): whole_step for a decode step (rotary inside the kernel where it can), not
for a mixed step's decodes; dependent for launches inside graphs that launch dependently (ops/launch.py);
wide as the backend's plan marks a batch whose programs fill the GPU many times over (its own tiles).

Decode graphs that offer a shared-prefix input launch the prefix kernel and the decode kernel that merges
its partials (CascadePlan): left to the capture, they were compiled there one after the other (about 6 s
of compiling on an H200, from an empty Triton cache).

The prefill-attention kernels join them (PrefillPlan): those of long prompts otherwise compiled by the
long-prompt warm-up at the end of start-up (on an H200 the platform's Hopper kernel alone took 6.4 s of
an 8.4 s warm-up), and the portable one the memory profile launches."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch

from sageinfer.attention import triton_backend
from sageinfer.attention.backend import AttentionMetadata
from sageinfer.background_warm_up import in_background
from sageinfer.ops import launch
from sageinfer.ops.paged_attention import WIDE_DECODE_CONFIGS


def _lengths(max_model_len: int) -> list[int]:
    """Context lengths on both sides of every power of two up to max_model_len: the plan's choices
    change only at such bounds (splits by length) and at the ragged split's least keys."""
    lengths = {1, max_model_len}
    k = 1
    while k <= max_model_len:
        lengths.update((k - 1, k, k + 1))
        k *= 2
    return sorted(x for x in lengths if 1 <= x <= max_model_len)


def _planned(backend, num_seqs: int, max_seq_len: int, num_kv_heads: int, cascade=None) -> AttentionMetadata:
    """What the backend's plan makes of a decode batch of these sizes (metadata without tensors)."""
    meta = AttentionMetadata(0, None, None, None, None, max_query_len=1, max_seq_len=max_seq_len,
                             query_start_loc_cpu=[], seq_lens_cpu=[1] * num_seqs, cascade_prefix_len=cascade)
    backend.plan(meta, num_kv_heads)
    return meta


def decode_plans(backend, max_num_seqs: int, max_model_len: int, num_kv_heads: int,
                 eager_decode_from: int) -> set[tuple[int, int, bool, bool, bool]]:
    """Every decode launch the backend's plan can choose outside graphs: for a mixed step's decodes
    (1 to max_num_seqs - 1 of them: their rotary and cache write done before), and for an eager
    decode step of eager_decode_from to max_num_seqs sequences. Not an eager step's cascade launch
    (a shared prefix in a step past the graphs), which still compiles on first use."""
    extra = {triton_backend.RAGGED_MIN_KEYS, triton_backend.RAGGED_MIN_KEYS + 1}
    lengths = sorted(set(_lengths(max_model_len)) | {x for x in extra if x <= max_model_len})
    plans = set()
    for num_seqs in range(1, max_num_seqs + 1):
        kinds = ([False] if num_seqs < max_num_seqs else []) + ([True] if num_seqs >= eager_decode_from else [])
        if not kinds:
            continue
        for length in lengths:
            meta = _planned(backend, num_seqs, length, num_kv_heads)
            plans.update((meta.num_splits, meta.min_split_keys, whole, False, meta.wide_decode) for whole in kinds)
    return plans


def graph_plans(backend, sizes: list[int], max_model_len: int, num_kv_heads: int,
                dependent_max: int) -> set:
    """The decode launches of the graphs of these batch sizes, planned as graph_runner.DecodeGraphs
    plans them (each of the backend's decode_graph_variants; sizes up to dependent_max launch dependently).
    Graphs that keep the shared-prefix input take a CascadePlan."""
    plans = set()
    for size in sizes:
        for length, cascade in backend.decode_graph_variants(size, num_kv_heads, max_model_len):
            meta = _planned(backend, size, length, num_kv_heads, cascade=cascade or None)
            if meta.cascade_prefix_len is None:
                plans.add((meta.num_splits, meta.min_split_keys, True, size <= dependent_max, meta.wide_decode))
            else:
                plans.add(CascadePlan(size <= dependent_max, meta.wide_decode))
    return plans


class PrefillPlan(NamedTuple):
    """A prefill launch of max_seq_len's kind (from LONG_CONTEXT keys: other tiles, and the platform's
    long-prompt kernel where it has one) and query_len's (query tiles are sized by it)."""
    max_seq_len: int
    query_len: int


class CascadePlan(NamedTuple):
    """A decode step that attends a shared prefix apart (cascade): the prefix kernel, then the decode
    kernel that merges its partials (both rotating the query where the step's decodes do)."""
    dependent: bool
    wide: bool = False


def prefill_plans(max_model_len: int, page_size: int, max_num_batched_tokens: int = 0) -> set[PrefillPlan]:
    """The prefill launches whose variants every start-up compiles: a prompt of one page, short and,
    where max_model_len reaches it, long. A page's query already takes the largest query tiles, as
    most prompts do (CUDA's page of 64); prompts short enough for smaller tiles compile on first use.
    A long prompt's launch also compiles the platform's kernel, which steps of many new tokens take too
    (triton_backend.many_new_tokens): it is warmed where such steps fit the token budget."""
    from sageinfer.ops.paged_attention import LONG_CONTEXT
    long_launch = max_model_len >= LONG_CONTEXT or triton_backend.many_new_tokens(max_num_batched_tokens)
    lengths = {page_size} | ({LONG_CONTEXT} if long_launch else set())
    return {PrefillPlan(length, page_size) for length in lengths}


def _without_wide(plan):
    """The plan as a cache whose wide decode batches take the usual tiles launches it."""
    if isinstance(plan, CascadePlan):
        return plan._replace(wide=False)
    if isinstance(plan, PrefillPlan):
        return plan
    return (*plan[:4], False)


def _order(plan) -> tuple:
    """Prefill plans first: the longest compiles (the long-prompt kernel) start at once."""
    kind = 0 if isinstance(plan, PrefillPlan) else 1 if isinstance(plan, CascadePlan) else 2
    return (kind, tuple(plan))


def warm_up_kernels(backend, layer, cache, plans, device, dtype, threads: int = 1,
                    enter_thread=lambda: None, again: bool = True, cancelled=None) -> None:
    """Launch the decode attention of each plan once (layer: layers.attention.Attention, cache: its
    LayerKVCache, dtype: the model's), as a step would: the same constexprs and argument kinds, so the
    same compile. With threads > 1 every plan first runs from that many threads, whose compiles overlap
    (Triton's compiler leaves the interpreter lock: 4 variants in 7.5 s against 13.9 s one after the
    other on 2 CPU cores), the launch mode (dependent or not) being per thread; enter_thread() makes
    the rank's device current in each. Then (if again) each plan runs once more from this thread:
    Triton sets up a kernel's per-device cache at its first launch, and where two threads first
    launched one kernel together, the compile of the thread whose cache lost is found again, in the
    disk cache. The cache may be any cache of the real one's layout (its strides do not depend on the
    number of blocks), one block of it included. cancelled: a threading.Event; once set, plans not yet
    begun are skipped."""
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    page = cache.k.shape[1]

    @torch.inference_mode()
    def run(plan):
        if isinstance(plan, PrefillPlan):  # the new tokens of one prompt in the cache's one page
            n = plan.query_len
            meta = AttentionMetadata(
                num_actual_tokens=n, slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
                seq_lens=torch.full((1,), n, dtype=torch.int32, device=device),
                block_table=torch.zeros((1, 1), dtype=torch.int32, device=device), max_query_len=n,
                max_seq_len=plan.max_seq_len, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
            q = torch.zeros(n, heads, dim, dtype=dtype, device=device)
            backend._attend(layer, q, torch.empty_like(q), cache, meta, None)
            return
        # One decode token over one page; a CascadePlan's with a shared prefix of length 0 (its kernel runs and exits).
        cascade = isinstance(plan, CascadePlan)
        num_splits, min_split_keys, whole_step, dependent, wide = (1, 0, True, *plan) if cascade else plan
        meta = AttentionMetadata(
            num_actual_tokens=1, slot_mapping=torch.full((1,), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
            seq_lens=torch.full((1,), page, dtype=torch.int32, device=device),
            block_table=torch.zeros((1, 1), dtype=torch.int32, device=device), max_query_len=1, max_seq_len=page,
            query_start_loc_cpu=[0, 1], seq_lens_cpu=[page], num_splits=num_splits, min_split_keys=min_split_keys,
            wide_decode=wide, cascade_prefix_len=torch.zeros(1, dtype=torch.int32, device=device) if cascade else None)
        q = torch.zeros(1, heads, dim, dtype=dtype, device=device)
        with launch.dependent_launch(dependent):
            if whole_step:
                k = torch.zeros(1, kv_heads, dim, dtype=dtype, device=device)
                backend.forward(layer, torch.zeros(1, dtype=torch.int64, device=device), q, k, torch.zeros_like(k),
                                cache, meta)
            else:
                backend._attend(layer, q, torch.empty_like(q), cache, meta, None)

    def in_thread(plan):
        if cancelled is not None and cancelled.is_set():
            return
        enter_thread()
        run(plan)

    if getattr(cache, "mode", 0) not in WIDE_DECODE_CONFIGS:  # the wide plans' kernels are the others': once each
        plans = {_without_wide(plan) for plan in plans}
    ordered = sorted(plans, key=_order)
    if threads > 1 and len(ordered) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(in_thread, ordered))  # raises a launch's error here
        if not again:
            return
    for plan in ordered:
        if cancelled is not None and cancelled.is_set():
            return
        run(plan)


def start_in_background(backend, layer, cache, plans, device, dtype, threads: int,
                        enter_thread=lambda: None) -> Callable[[bool], None]:
    """warm_up_kernels's compiles in a thread of their own, so that start-up goes on meanwhile
    (the memory profile, the cache allocation: on an H200 the warm-up took 6.8 s of a 38 s start-up
    from an empty Triton cache); the finish() returned waits for them, raises their first error, and
    launches each plan once more from the caller's thread (a launch where the compile is in memory).
    finish(cancel=True), for a start-up that failed: plans not yet begun are skipped, nothing is raised
    or launched again."""
    return in_background(
        lambda cancelled: warm_up_kernels(backend, layer, cache, plans, device, dtype, threads, enter_thread,
                                          again=False, cancelled=cancelled),
        lambda: warm_up_kernels(backend, layer, cache, plans, device, dtype, threads=1), "decode-warm-up",
        enter_thread)
