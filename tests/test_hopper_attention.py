"""The Hopper prefill kernel (platforms/hopper_attention.py) against the torch reference on an sm_90
GPU, and on any machine: when the Triton backend hands a prefill to a platform kernel and when it
falls back to the portable one."""
import types

import pytest
import torch

from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.attention.triton_backend import TritonBackend
from sageinfer.layers.rotary import RotaryEmbedding
from sageinfer.ops.paged_attention import LONG_CONTEXT
from kernels_util import DEVICE, TOL, poison_unwritten_slots, random_paged_batch, rel_err

ON_HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)

# Prompts, chunks after cached context, decode rows, tiles that run past a sequence's end (NaN there).
QUERY_LENS, CONTEXT_LENS = [300, 1, 129, 64, 7, 200], [256, 40, 0, 1000, 5000, 64]


@pytest.mark.skipif(not ON_HOPPER, reason="Gluon kernel for NVIDIA Hopper (sm_90)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [64, 128, 256])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(8, 8), (16, 8), (32, 8), (64, 8)])
def test_hopper_prefill_matches_reference(num_heads, num_kv_heads, page, dtype):
    from sageinfer.platforms import hopper_attention

    k_cache, v_cache, meta = random_paged_batch(QUERY_LENS, CONTEXT_LENS, num_kv_heads, 128, page, dtype,
                                                seed=page + num_heads)
    poison_unwritten_slots(k_cache, v_cache, meta)
    q = torch.randn(sum(QUERY_LENS), num_heads, 128, device=DEVICE, dtype=dtype)
    clean = LayerKVCache(torch.nan_to_num(k_cache).double(), torch.nan_to_num(v_cache).double())
    ref = paged_attention_ref(q.double(), clean, meta, 128 ** -0.5)
    # Every shape in the engine's configuration; the measured alternatives on one of them.
    alternatives = ({"pingpong": False}, {"stages": 3}, {"block_n": 64, "stages": 4})
    for config in ({},) + (alternatives if (num_heads, page, dtype) == (32, 64, torch.bfloat16) else ()):
        out = torch.full_like(q, float("nan"))
        hopper_attention.prefill_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens,
                                           meta.query_start_loc, meta.num_seqs, meta.max_query_len, 128 ** -0.5,
                                           config=config)
        assert not out.isnan().any(), config
        assert rel_err(out, ref) < TOL[dtype], config


@pytest.mark.skipif(not ON_HOPPER, reason="Gluon kernel for NVIDIA Hopper (sm_90)")
def test_hopper_prefill_refuses_what_it_cannot_serve():
    from sageinfer.platforms import hopper_attention

    assert not hopper_attention.supports(16, 128, 32, 8, torch.bfloat16)  # pages below one tile
    assert not hopper_attention.supports(64, 64, 32, 8, torch.bfloat16)  # head dim
    assert not hopper_attention.supports(64, 128, 48, 1, torch.bfloat16)  # 48 heads per KV head
    assert not hopper_attention.supports(64, 128, 32, 8, torch.int8)


def test_platform_offers_the_kernel_only_on_hopper_and_survives_a_failed_import(monkeypatch):
    import sys

    from sageinfer.platforms.cuda import CudaPlatform

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    assert CudaPlatform().prefill_attention() is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "sageinfer.platforms.hopper_attention", None)  # import fails
    assert CudaPlatform().prefill_attention() is None


class _FakeLongPrefill:
    """Stands in for a platform kernel: records its calls, answers with `answer` (None = fall back)."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def supports(self, page_size, head_dim, num_heads, num_kv_heads, kv_dtype):
        return page_size >= 64

    def __call__(self, q, k_cache, v_cache, out, *args):
        self.calls += 1
        if self.answer is None:
            return None
        out.fill_(self.answer)
        return out


def _prefill_step(max_seq_len):
    """A 5-token chunk after 3 cached tokens on a 128-token page cache; max_seq_len as the step claims."""
    head_dim, heads, kv_heads = 16, 2, 1
    k_cache, v_cache, meta = random_paged_batch([5], [3], kv_heads, head_dim, 128, torch.float32, seed=4)
    meta.max_seq_len = max_seq_len
    meta.slot_mapping = (meta.block_table[0, 0] * 128 + torch.arange(3, 8, device=DEVICE)).long()
    layer = types.SimpleNamespace(q_norm=None, k_norm=None, scale=head_dim ** -0.5,
                                  rotary_emb=RotaryEmbedding(head_dim, 64, 10000.0, None).to(DEVICE))
    q, k, v = (torch.randn(5, n, head_dim, device=DEVICE) for n in (heads, kv_heads, kv_heads))
    positions = torch.arange(3, 8, device=DEVICE)
    return layer, positions, q, k, v, LayerKVCache(k_cache, v_cache), meta


def test_long_prompts_go_to_the_platform_kernel():
    fake = _FakeLongPrefill(answer=7.0)
    layer, positions, q, k, v, cache, meta = _prefill_step(LONG_CONTEXT)
    out = TritonBackend(platform_prefill=fake).forward(layer, positions, q, k, v, cache, meta)
    assert fake.calls == 1 and torch.all(out == 7.0)


def test_short_prompts_and_refusals_use_the_portable_kernel():
    for max_seq_len, answer in ((LONG_CONTEXT - 1, 7.0), (LONG_CONTEXT, None)):
        fake = _FakeLongPrefill(answer=answer)
        layer, positions, q, k, v, cache, meta = _prefill_step(max_seq_len)
        out = TritonBackend(platform_prefill=fake).forward(layer, positions, q, k, v, cache, meta)
        # q was rotated in place and the chunk's k/v written to the cache: the reference reads both.
        ref = paged_attention_ref(q, cache, meta, layer.scale)
        assert fake.calls == (answer is None)
        assert rel_err(out, ref) < TOL[torch.float32]


def test_steps_of_many_new_tokens_go_to_the_platform_kernel(monkeypatch):
    """A short-context eager step reaches the platform kernel once its prefills hold PLATFORM_PREFILL_MIN_TOKENS
    new tokens (5 here), not below, not when the bound is 0, and not without the host's block table (a
    step a graph captures)."""
    import sageinfer.attention.triton_backend as tb
    for bound, eager, taken in ((5, True, True), (6, True, False), (0, True, False), (5, False, False)):
        monkeypatch.setattr(tb, "PLATFORM_PREFILL_MIN_TOKENS", bound)
        fake = _FakeLongPrefill(answer=7.0)
        layer, positions, q, k, v, cache, meta = _prefill_step(LONG_CONTEXT - 1)
        if eager:
            meta.block_table_cpu = meta.block_table.cpu().numpy()
        out = TritonBackend(platform_prefill=fake).forward(layer, positions, q, k, v, cache, meta)
        assert fake.calls == taken and bool(torch.all(out == 7.0)) == taken


class _WidenedPrefill:
    """A platform kernel on 16/32-bit pages only, computed by the portable kernel; records the pages' dtype."""

    def __init__(self):
        self.dtypes = []

    def supports(self, page_size, head_dim, num_heads, num_kv_heads, kv_dtype):
        return kv_dtype in (torch.float16, torch.bfloat16, torch.float32)

    def __call__(self, q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc, num_seqs, max_query_len,
                 scale):
        from sageinfer.ops.prefill_attention import prefill_attention
        self.dtypes.append(k_cache.dtype)
        return prefill_attention(q, k_cache, v_cache, out, block_table, seq_lens, query_start_loc, num_seqs,
                                 max_query_len, scale)


@pytest.mark.parametrize("fp8_scale", [1.0, 0.5, "int8"])
@pytest.mark.parametrize("host_table", [False, True])
def test_an_fp8_cache_reaches_the_platform_kernel_on_widened_pages(monkeypatch, fp8_scale, host_table):
    """Long prefills over an FP8 (or INT8) cache copy the step's pages into the model dtype and run the
    platform kernel on them: the same attention as the reference over the quantized cache, three
    sequences of several pages (INT8: the scales of rows nothing wrote are NaN). With the host's block
    table (eager steps), a page that two sequences read (a shared prefix) is copied once."""
    import sageinfer.attention.triton_backend as tb
    monkeypatch.setattr(tb, "LONG_CONTEXT", 64)
    head_dim, heads, kv_heads, page = 16, 4, 2, 64
    query_lens, context_lens = [40, 9, 20], [100, 70, 80]
    k32, v32, meta = random_paged_batch(query_lens, context_lens, kv_heads, head_dim, page, torch.float32, seed=6)
    meta.block_table[2, 0] = meta.block_table[1, 0]  # the last two sequences share their first page
    if host_table:
        meta.block_table_cpu = meta.block_table.cpu().numpy()
    if fp8_scale == "int8":
        scales = [c.abs().amax(-1).clamp(min=1e-6) / 127.0 for c in (k32, v32)]
        k8, v8 = ((c / s.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8) for c, s in zip((k32, v32), scales))
        poison_unwritten_slots(*scales, meta)  # no write set the scales of rows past a sequence's end
        cache = LayerKVCache(k8, v8, "int8", scales[0], scales[1])
    else:
        cache = LayerKVCache((k32 / fp8_scale).to(torch.float8_e4m3fn), (v32 / fp8_scale).to(torch.float8_e4m3fn),
                             "fp8", fp8_scale=fp8_scale)
    # The chunks' own slots (written by the cache write before attention) follow each context.
    slots = []
    for i, (q_len, ctx) in enumerate(zip(query_lens, context_lens)):
        pos = torch.arange(ctx, ctx + q_len)
        slots.append(meta.block_table[i, pos // page].cpu().long() * page + pos % page)
    meta.slot_mapping = torch.cat(slots).to(DEVICE)
    layer = types.SimpleNamespace(q_norm=None, k_norm=None, scale=head_dim ** -0.5,
                                  rotary_emb=RotaryEmbedding(head_dim, 256, 10000.0, None).to(DEVICE))
    total = sum(query_lens)
    q, k, v = (torch.randn(total, n, head_dim, device=DEVICE) for n in (heads, kv_heads, kv_heads))
    positions = torch.cat([torch.arange(c, c + n) for n, c in zip(query_lens, context_lens)]).to(DEVICE)
    platform_kernel = _WidenedPrefill()
    for limit, widened in ((tb.WIDEN_MAX_TOKENS, [torch.float32]), (100, [])):
        # over the token limit, the portable kernel reads the FP8 pages as stored
        monkeypatch.setattr(tb, "WIDEN_MAX_TOKENS", limit)
        platform_kernel.dtypes, meta.packed_pages = [], None
        q_step = q.clone()  # rotated in place by the step
        out = TritonBackend(platform_prefill=platform_kernel).forward(layer, positions, q_step, k.clone(),
                                                                      v.clone(), cache, meta)
        assert platform_kernel.dtypes == widened
        pages = meta.packed_pages[0].tolist()
        # pages of 140, 79 and 100 tokens: 3 + 2 + 2, one of them read twice
        assert len(pages) == (6 if host_table else 7) and len(set(pages)) == 6
        assert rel_err(out, paged_attention_ref(q_step.double(), cache, meta, layer.scale)) < TOL[torch.float32]
