"""Triton paged attention against the torch reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.ops.paged_attention import paged_attention
from kernels_util import DEVICE, TOL, random_paged_batch, rel_err

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
