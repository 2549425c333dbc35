"""Page-aligned prefill attention against the torch reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from sageinfer.attention.backend import LayerKVCache, new_kv_scales
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.ops.prefill_attention import prefill_attention, supports
from kernels_util import DEVICE, TOL, poison_unwritten_slots, random_paged_batch, rel_err

CASES = {
    # name: (query_lens, context_lens, num_heads, num_kv_heads, head_dim, page_size, block_n)
    "prompts_of_many_lengths": ([5, 40, 1, 77], [0, 0, 0, 0], 4, 2, 32, 32, 32),
    "chunk_after_cached_context": ([50, 3], [90, 64], 4, 1, 16, 64, 32),
    "mha_two_tiles_per_page": ([70], [33], 2, 2, 32, 64, 32),
    "decode_rows_in_the_batch": ([1, 1, 20], [17, 100, 5], 8, 2, 16, 32, 32),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_attention_matches_reference(case, dtype):
    query_lens, context_lens, num_heads, num_kv_heads, head_dim, page, block_n = CASES[case]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page, dtype,
                                                seed=len(case))
    poison_unwritten_slots(k_cache, v_cache, meta)
    q = torch.randn(sum(query_lens), num_heads, head_dim).to(dtype).to(DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                      meta.num_seqs, meta.max_query_len, head_dim ** -0.5,
                      config={"block_m": 32, "block_n": block_n, "num_warps": 4, "num_stages": 2})
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("q_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["prompts_of_many_lengths", "chunk_after_cached_context", "decode_rows_in_the_batch"])
def test_prefill_attention_reads_an_fp8_cache(case, q_dtype):
    """FP8 e4m3 values times one scale: the attention of the values the cache encodes (a bf16 query,
    also past fp16's range, through the fp16 dots)."""
    query_lens, context_lens, num_heads, num_kv_heads, head_dim, page, block_n = CASES[case]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page, torch.float32,
                                                seed=len(case))
    scale = float(max(k_cache.abs().max(), v_cache.abs().max())) / 448.0
    poison_unwritten_slots(k_cache, v_cache, meta)  # NaN stays NaN in FP8
    k8, v8 = (c.div(scale).to(torch.float8_e4m3fn) for c in (k_cache, v_cache))
    q = torch.randn(sum(query_lens), num_heads, head_dim)
    if q_dtype == torch.bfloat16:
        q[0, 0, :3] = torch.tensor([8e4, -1e-4, 3e-6])
    q = q.to(q_dtype).to(DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k8.double() * scale, v8.double() * scale), meta,
                              head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k8, v8, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                      meta.max_query_len, head_dim ** -0.5, kv_scale=scale,
                      config={"block_m": 32, "block_n": block_n, "num_warps": 4, "num_stages": 2})
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[q_dtype]


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("case", ["prompts_of_many_lengths", "chunk_after_cached_context", "decode_rows_in_the_batch"])
def test_prefill_attention_reads_an_int8_cache(case, head_major):
    """INT8 values with a scale per token and KV head (stored token-major or head-major): the attention
    of the values the cache encodes; the scales of rows no sequence owns are NaN, and are never read
    into the result."""
    query_lens, context_lens, num_heads, num_kv_heads, head_dim, page, block_n = CASES[case]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, num_kv_heads, head_dim, page, torch.float32,
                                                seed=len(case))
    gen = torch.Generator().manual_seed(5)
    k8, v8 = ((c.cpu() * 40).clamp(-127, 127).round().to(torch.int8).to(DEVICE) for c in (k_cache, v_cache))
    ks, vs = ((torch.rand(k_cache.shape[:3], generator=gen) / 40 + 0.005).to(DEVICE) for _ in range(2))
    nan_k, nan_v = ks[..., None].expand(k_cache.shape).clone(), vs[..., None].expand(v_cache.shape).clone()
    poison_unwritten_slots(nan_k, nan_v, meta)  # the rows no sequence owns
    ks, vs = nan_k[..., 0].contiguous(), nan_v[..., 0].contiguous()
    if head_major:
        ks, vs = (new_kv_scales(*s.shape, DEVICE).copy_(s) for s in (ks, vs))
    q = torch.randn(sum(query_lens), num_heads, head_dim).half().to(DEVICE)
    owned = ~ks.isnan()
    kd = torch.where(owned[..., None], k8.double() * ks.double()[..., None], 0.0)
    vd = torch.where(owned[..., None], v8.double() * vs.double()[..., None], 0.0)
    ref = paged_attention_ref(q.double(), LayerKVCache(kd, vd), meta, head_dim ** -0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k8, v8, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                      meta.max_query_len, head_dim ** -0.5, k_scale=ks, v_scale=vs,
                      config={"block_m": 32, "block_n": block_n, "num_warps": 4, "num_stages": 2})
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[torch.float16]
    with pytest.raises(ValueError, match="INT8"):
        prefill_attention(q, k8, v8, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                          meta.max_query_len, head_dim ** -0.5)


@pytest.mark.skipif(DEVICE != "cuda", reason="tensor descriptors need a GPU with a copy engine")
def test_prefill_attention_with_tensor_descriptors():
    query_lens, context_lens = [300, 1, 129], [256, 40, 0]
    k_cache, v_cache, meta = random_paged_batch(query_lens, context_lens, 8, 128, 128, torch.bfloat16, seed=9)
    poison_unwritten_slots(k_cache, v_cache, meta)
    q = torch.randn(sum(query_lens), 32, 128, device=DEVICE, dtype=torch.bfloat16)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, 128 ** -0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc,
                      meta.num_seqs, meta.max_query_len, 128 ** -0.5, config={"use_tma": True})
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_unsupported_cache_is_refused():
    assert not supports(16, 128, torch.bfloat16, block_n=64)
    assert not supports(128, 96, torch.bfloat16)
    assert not supports(128, 128, torch.int16) and supports(128, 128, torch.float8_e4m3fn)
    assert supports(128, 128, torch.int8)
    k_cache, v_cache, meta = random_paged_batch([4], [0], 1, 16, 16, torch.float32)
    q = torch.randn(4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="whole"):
        prefill_attention(q, k_cache, v_cache, torch.empty_like(q), meta.block_table, meta.seq_lens,
                          meta.query_start_loc, 1, 4, 0.25, config={"block_n": 32})
