"""Triton paged attention against the torch reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from sageinfer.attention.backend import LayerKVCache, new_kv_scales
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.ops import paged_attention as pa
from sageinfer.ops.paged_attention import paged_attention
from kernels_util import DEVICE, TOL, decode_step_before_rotary, random_paged_batch, rel_err

CASES = {
    # name: (query_lens, context_lens, num_heads, num_kv_heads, head_dim, page_size)
    "mixed_prefill_and_decode": ([5, 1, 17, 1], [0, 40, 3, 1], 4, 2, 32, 16),
    "prefill_with_cached_context": ([33], [70], 4, 1, 16, 8),
    "decode_only_gqa": ([1, 1, 1], [1, 29, 64], 8, 2, 32, 16),
    "odd_head_dim_mha": ([7, 1], [0, 13], 2, 2, 24, 4),
    "single_token_prompt": ([1], [0], 2, 1, 16, 16),
}


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case, dtype):
    query_lens, context_lens, num_heads, num_kv_heads, head_dim, page = CASES[case]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page, dtype,
                                                seed=hash(case) % 1000)
    q = torch.randn(sum(query_lens), num_heads, head_dim).to(dtype).to(DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                    meta.num_seqs, meta.max_query_len, head_dim ** -0.5)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["mixed_prefill_and_decode", "decode_only_gqa"])
def test_fp8_cache_matches_the_reference_over_its_values(case, dtype):
    """An FP8 cache with its per-tensor scale: a bf16 query runs the dots in fp16 (scaled by 2^-8),
    which must hold large queries (|q| past fp16's 65,504) and small ones."""
    query_lens, context_lens, num_heads, num_kv_heads, head_dim, page = CASES[case]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page, torch.float32,
                                                seed=7)
    fp8_scale = 0.05
    k8, v8 = ((c / fp8_scale).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    q = torch.randn(sum(query_lens), num_heads, head_dim, device=DEVICE)
    if dtype == torch.bfloat16:
        q[0, 0, :4] = torch.tensor([9e4, -7e4, 1e-4, -3e-6])  # beyond fp16's range, and tiny
    q = q.to(dtype)
    cache = LayerKVCache(k8.double() * fp8_scale, v8.double() * fp8_scale)
    ref = paged_attention_ref(q.double(), cache, meta, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k8, v8, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                    meta.max_query_len, head_dim ** -0.5, kv_mode=1, fp8_scale=fp8_scale)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("block_n,page", [(16, 32), (32, 64), (64, 64)])
@pytest.mark.parametrize("kv_mode", [0, 2, "2 head-major"] + ([1] if DEVICE == "cuda" else []))  # fp8: GPU only
def test_key_tiles_within_one_page_match_reference(block_n, page, kv_mode):
    """Key tiles that lie in one page take its id once (ops/paged_attention.ONE_PAGE_TILES): decodes whose
    keys end mid-page and mid-tile, and a mixed step's prefill tiles, over pages scattered in the cache."""
    heads, kv_heads, head_dim = 8, 2, 32
    head_major = kv_mode == "2 head-major"
    kv_mode = 2 if head_major else kv_mode
    gen = torch.Generator().manual_seed(block_n + page + 3 * kv_mode)
    cases = (([1] * 5, [1, page - 1, page, 2 * page + 22, 5 * page - 9], {"block_n": block_n, "num_warps": 1,
                                                                            "num_stages": 2}),
             ([5, 1, 17, 1], [0, 2 * page + 12, page + 6, 3 * page], None))
    for query_lens, context_lens, config in cases:
        k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, kv_heads, head_dim, page, torch.float32,
                                                    seed=block_n + page)
        scales = [None, None]
        if kv_mode == 2:
            k_cache, v_cache = ((c * 20).clamp(-127, 127).round() for c in (k_cache, v_cache))
            scales = [(torch.rand(k_cache.shape[:3], generator=gen) / 20 + 0.01).to(DEVICE) for _ in range(2)]
            values = [c * s[..., None] for c, s in zip((k_cache, v_cache), scales)]
            if head_major:
                scales = [new_kv_scales(*s.shape, DEVICE).copy_(s) for s in scales]
            stored = [c.to(torch.int8) for c in (k_cache, v_cache)]
        elif kv_mode == 1:
            values = [c.to(torch.float8_e4m3fn).float() for c in (k_cache, v_cache)]
            stored = [c.to(torch.float8_e4m3fn) for c in (k_cache, v_cache)]
        else:
            values = stored = [k_cache, v_cache]
        q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(DEVICE)
        if kv_mode == 1:
            q = q.half()
        ref = paged_attention_ref(q.double(), LayerKVCache(values[0].double(), values[1].double()), meta,
                                  head_dim ** -0.5)
        out = torch.full_like(q, float("nan"))
        paged_attention(q, stored[0], stored[1], out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                        meta.num_seqs, meta.max_query_len, head_dim ** -0.5, config=config, k_scale=scales[0],
                        v_scale=scales[1], kv_mode=kv_mode, max_seq_len=meta.max_seq_len)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[q.dtype]


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_kv_decode_matches_reference(num_splits):
    query_lens, context_lens = [1, 1, 1], [3, 90, 150]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, 2, 32, 16, torch.float32, seed=5)
    q = torch.randn(3, 4, 32, device=DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, 32 ** -0.5)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                    meta.num_seqs, 1, 32 ** -0.5, num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("num_splits, min_split_keys", [(4, 64), (4, 128), (4, 4096), (64, 16), (4, 0), (64, 0)])
def test_splits_of_a_least_size_match_reference(num_splits, min_split_keys):
    """Splits of at least min_split_keys: a short sequence uses one split, a long one all of them; the
    splits a sequence leaves unused write nothing (their partials stay NaN) and the merge skips them.
    Without a least size (0) a sequence of fewer key tiles than splits leaves the rest unused too."""
    context_lens = [2, 63, 64, 299, 1000, 0]
    k_cache, v_cache, meta = random_paged_batch([1] * 6, context_lens, 2, 32, 16, torch.float32, seed=6)
    q = torch.randn(6, 4, 32, device=DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, 32 ** -0.5)
    out = torch.full_like(q, float("nan"))
    empty = torch.empty
    with pytest.MonkeyPatch.context() as mp:  # the partials start as NaN, not as whatever memory held
        mp.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        paged_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                        meta.num_seqs, 1, 32 ** -0.5, num_splits=num_splits, min_split_keys=min_split_keys)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("merge_heads", [2, 4, 8])
@pytest.mark.parametrize("num_splits, min_split_keys", [(4, 0), (8, 16)])
def test_merges_of_several_heads_a_program_match_the_reference(monkeypatch, merge_heads, num_splits, min_split_keys):
    """SAGEINFER_MERGE_HEADS: a merge program takes several heads (6 here: the last program's extra heads
    masked where 4 or 8 do not divide them), unused splits' NaN partials skipped as with one head."""
    monkeypatch.setattr(pa, "MERGE_HEADS", merge_heads)
    context_lens = [2, 63, 299, 1000, 0]
    k_cache, v_cache, meta = random_paged_batch([1] * 5, context_lens, 2, 32, 16, torch.float32, seed=8)
    q = torch.randn(5, 6, 32, device=DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, 32 ** -0.5)
    out = torch.full_like(q, float("nan"))
    empty = torch.empty
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        paged_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                        meta.num_seqs, 1, 32 ** -0.5, num_splits=num_splits, min_split_keys=min_split_keys)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("num_splits, min_split_keys", [(1, 0), (4, 0), (4, 64)])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kv_mode", [0, 2, "2 head-major"] + ([1] if DEVICE == "cuda" else []))  # fp8: GPU only
def test_decode_with_rotary_inside_equals_rope_and_cache_then_attention(num_splits, min_split_keys, qk_norm,
                                                                        kv_mode):
    """rope=... normalises and rotates q in registers and writes the new k/v (int8 too, its scales
    token-major or head-major) from the program that reads the last key; the result must equal
    ops.rope_cache followed by plain attention."""
    head_major = kv_mode == "2 head-major"
    kv_mode = 2 if head_major else kv_mode
    from sageinfer.ops.rope_cache import rope_and_cache
    heads, kv_heads, head_dim, page, dtype = 8, 2, 32, 16, torch.float16
    # 127: the new key ends a key tile, which the unmasked loop reads after the write; the last sequence is a
    # graph's padding row: slot -1, nothing written
    context_lens = [4, 70, 127, 130, 0]
    k_cache, v_cache, meta = random_paged_batch([1] * 5, context_lens, kv_heads, head_dim, page, dtype, seed=9)
    gen = torch.Generator().manual_seed(3)
    q, k, v, rope = decode_step_before_rotary(meta, context_lens, heads, kv_heads, head_dim, page, dtype, gen, qk_norm)
    positions, _, _, cos_sin, slots, q_norm, k_norm, _ = rope
    scales = [torch.rand(k_cache.shape[:3], generator=gen).to(DEVICE) for _ in range(2)] if kv_mode == 2 else [None] * 2
    if head_major:
        scales = [new_kv_scales(*s.shape, DEVICE).copy_(s) for s in scales]
    if kv_mode == 2:
        k_cache, v_cache = [(c.float() * 20).clamp(-127, 127).to(torch.int8) for c in (k_cache, v_cache)]
    elif kv_mode == 1:
        k_cache, v_cache = [c.to(torch.float8_e4m3fn) for c in (k_cache, v_cache)]

    def caches():
        return [t.clone() if t is not None else None for t in (k_cache, v_cache, *scales)]
    kc, vc, ks, vs = caches()
    q_rot = rope_and_cache(positions, q.clone(), k, v, cos_sin, kc, vc, slots, q_norm, k_norm, 1e-6,
                           ks, vs, kv_mode)
    ref = torch.empty_like(q)
    paged_attention(q_rot, kc, vc, ref, meta.block_table, meta.seq_lens, meta.query_start_loc, 5, 1,
                    head_dim ** -0.5, num_splits=num_splits, k_scale=ks, v_scale=vs, kv_mode=kv_mode)
    kc2, vc2, ks2, vs2 = caches()
    out = torch.full_like(q, float("nan"))
    q_before = q.clone()
    paged_attention(q, kc2, vc2, out, meta.block_table, meta.seq_lens, meta.query_start_loc, 5, 1, head_dim ** -0.5,
                    num_splits=num_splits, k_scale=ks2, v_scale=vs2, kv_mode=kv_mode,
                    rope=rope,
                    min_split_keys=min_split_keys)
    assert torch.equal(q, q_before)  # q itself is not rotated in place
    for new, old in ((kc2, kc), (vc2, vc)):  # compared as bytes: fp8 has no equality kernel everywhere
        assert torch.equal(new.view(torch.uint8), old.view(torch.uint8))
    if kv_mode == 2:  # scales to fp32 rounding: the two kernels may contract rotary's multiply-adds apart
        assert torch.allclose(ks2, ks, rtol=1e-5, atol=0) and torch.allclose(vs2, vs, rtol=1e-5, atol=0)
    assert rel_err(out[:4], ref[:4]) < 1e-3


def test_rotary_inside_attention_refuses_prefill():
    k_cache, v_cache, meta = random_paged_batch([3], [0], 1, 16, 16, torch.float32)
    q = torch.zeros(3, 2, 16, device=DEVICE)
    rope = (torch.zeros(3, dtype=torch.int64, device=DEVICE), q[:, :1], q[:, :1], torch.zeros(8, 16, device=DEVICE),
            torch.zeros(3, dtype=torch.int64, device=DEVICE), None, None, 1e-6)
    with pytest.raises(ValueError, match="decode batches"):
        paged_attention(q, k_cache, v_cache, torch.empty_like(q), meta.block_table, meta.seq_lens,
                        meta.query_start_loc, 1, 3, 0.25, rope=rope)


def test_key_tiles_shrink_to_the_shared_memory_of_the_device():
    """Tiles tuned for 16-bit caches: a float32 model with 128-wide heads asked an H200 for 320 KB of
    shared memory (232,448 bytes there) and failed to launch; 128 x 64 tiles take 192 KB."""
    from sageinfer.ops.launch import fit_key_tiles
    h200, a100 = 232448, 166912
    assert fit_key_tiles(128, 128, 3, 128, 2, h200) == (128, 3)  # bf16: as tuned
    assert fit_key_tiles(128, 128, 3, 128, 4, h200) == (64, 3)
    assert fit_key_tiles(128, 128, 3, 128, 4, a100) == (32, 3)
    assert fit_key_tiles(128, 128, 3, 128, 4, None) == (128, 3)  # no limit known (the interpreter)


def test_int8_scales_are_taken_token_major_or_head_major_and_nothing_else():
    from sageinfer.ops.rope_cache import scales_head_major
    token_major = torch.zeros(5, 16, 2)
    assert scales_head_major(token_major) is False
    assert scales_head_major(new_kv_scales(5, 16, 2, "cpu")) is True
    with pytest.raises(ValueError, match="INT8 KV scales"):
        scales_head_major(torch.zeros(16, 5, 2).transpose(0, 1))


@pytest.mark.parametrize("num_splits", [1, 4])
def test_int8_scales_stored_head_major_read_and_write_as_token_major_ones(num_splits):
    """The same INT8 cache with its scales stored both ways: decode attention gives the same output,
    and rope_and_cache writes the same scales (compared as indexed), token-major being the layout the
    other tests hold against the reference."""
    from sageinfer.layers.rotary import RotaryEmbedding
    from sageinfer.ops.rope_cache import rope_and_cache
    heads, kv_heads, head_dim, page = 4, 2, 32, 16
    context_lens = [3, 40, 77]
    k_cache, v_cache, meta = random_paged_batch([1] * 3, context_lens, kv_heads, head_dim, page, torch.float32, seed=4)
    gen = torch.Generator().manual_seed(8)
    k8, v8 = ((c.cpu() * 20).clamp(-127, 127).to(torch.int8).to(DEVICE) for c in (k_cache, v_cache))
    token_major = [(torch.rand(k_cache.shape[:3], generator=gen) / 20 + 0.01).to(DEVICE) for _ in range(2)]
    head_major = [new_kv_scales(*s.shape, DEVICE).copy_(s) for s in token_major]
    q = torch.randn(3, heads, head_dim, generator=gen).half().to(DEVICE)
    outs = []
    for ks, vs in (token_major, head_major):
        out = torch.full_like(q, float("nan"))
        paged_attention(q, k8, v8, out, meta.block_table, meta.seq_lens, meta.query_start_loc, 3, 1,
                        head_dim ** -0.5, num_splits=num_splits, k_scale=ks, v_scale=vs, kv_mode=2)
        outs.append(out)
    assert not outs[0].isnan().any() and torch.equal(outs[0], outs[1])
    rotary = RotaryEmbedding(head_dim, 256, 10000.0, None).to(DEVICE)
    k, v = (torch.randn(3, kv_heads, head_dim, generator=gen).half().to(DEVICE) for _ in range(2))
    table = meta.block_table.cpu()
    slots = torch.tensor([int(table[i, c // page]) * page + c % page for i, c in enumerate(context_lens)]).to(DEVICE)
    written = []
    for scales in (token_major, head_major):
        kc, vc, ks, vs = k8.clone(), v8.clone(), scales[0].clone(memory_format=torch.preserve_format), \
            scales[1].clone(memory_format=torch.preserve_format)
        rope_and_cache(torch.tensor(context_lens, device=DEVICE), q.clone(), k, v, rotary.cos_sin_cache, kc, vc, slots,
                       k_scale=ks, v_scale=vs, kv_mode=2)
        written.append((kc, vc, ks, vs))
    assert written[1][2].stride() == head_major[0].stride()
    for a, b in zip(*written):
        assert torch.equal(a, b)
