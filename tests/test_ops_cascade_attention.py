"""Cascade decode (shared prefix attended once, merged with each sequence's suffix) against the
plain paged-attention reference."""
import numpy as np
import pytest
import torch

from sageinfer.attention.backend import LayerKVCache
from sageinfer.attention.torch_ref import paged_attention_ref
from sageinfer.ops.cascade_attention import common_prefix_blocks, prefix_attention
from sageinfer.ops.paged_attention import PREFIX_ALIGN, paged_attention
from kernels_util import DEVICE, TOL, decode_step_before_rotary, random_paged_batch, rel_err

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SMALL = {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("dtype", DTYPES)
# pages of 64 hold whole key tiles (ops/paged_attention.ONE_PAGE_TILES), pages of 16 do not
@pytest.mark.parametrize("prefix_tokens,num_splits,config,page", [(128, 1, SMALL, 16), (256, 3, SMALL, 16),
                                                                   (0, 2, SMALL, 16), (256, 2, None, 16),
                                                                   (128, 1, SMALL, 64), (256, 2, None, 64),
                                                                   (192, 2, None, 64)])
def test_cascade_decode_matches_reference(dtype, prefix_tokens, num_splits, config, page):
    num_heads, num_kv_heads, head_dim = 8, 2, 32
    context = [prefix_tokens + n for n in (1, 30, 77, 64, 130)]
    k_cache, v_cache, meta = random_paged_batch([1] * len(context), context, num_kv_heads, head_dim, page, dtype,
                                                seed=prefix_tokens + num_splits)
    shared = 256 // page  # the tables share their first 256 tokens; the cascade uses prefix_tokens of them
    meta.block_table[:, :shared] = meta.block_table[0, :shared].clone()
    q = torch.randn(len(context), num_heads, head_dim).to(dtype).to(DEVICE)
    ref = paged_attention_ref(q.double(), LayerKVCache(k_cache.double(), v_cache.double()), meta, head_dim ** -0.5)
    prefix_len = torch.tensor([prefix_tokens], dtype=torch.int32, device=DEVICE)
    part_out, part_lse = prefix_attention(q, k_cache, v_cache, meta.block_table[0], prefix_len, head_dim ** -0.5,
                                          num_splits, config)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                    1, head_dim ** -0.5, prefix=(part_out, part_lse, prefix_len))
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_cascade_refuses_what_it_cannot_merge():
    k_cache, v_cache, meta = random_paged_batch([3], [0], 1, 16, 16, torch.float32)
    q = torch.randn(3, 2, 16, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="decode batches"):
        paged_attention(q, k_cache, v_cache, torch.empty_like(q), meta.block_table, meta.seq_lens,
                        meta.query_start_loc, 1, 3, 0.25, prefix=(q, q, zero))
    odd = torch.randn(3, 2, 24, device=DEVICE)  # rotary pairs need power-of-two head dims
    rope = (zero.long(), torch.zeros(8, 24, device=DEVICE), None, 1e-6)
    with pytest.raises(ValueError, match="power-of-two head dims"):
        prefix_attention(odd, odd.new_zeros(4, 16, 1, 24), odd.new_zeros(4, 16, 1, 24), zero, zero, 0.2, 1, rope=rope)
    wide = {"block_n": 2 * PREFIX_ALIGN, "num_warps": 4, "num_stages": 1}  # a suffix would start mid-tile
    k_cache, v_cache, meta = random_paged_batch([1], [300], 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="key tiles that divide"):
        paged_attention(q[:1], k_cache, v_cache, torch.empty_like(q[:1]), meta.block_table, meta.seq_lens,
                        meta.query_start_loc, 1, 1, 0.25, config=wide, prefix=(q, q, zero))


def test_common_prefix_blocks_stops_at_the_first_difference_and_before_the_newest_token():
    table = np.array([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 2, 3]], dtype=np.int32)
    assert common_prefix_blocks(table, np.array([60, 60, 60]), 16) == 2
    assert common_prefix_blocks(table[:2], np.array([64, 64]), 16) == 3
    assert common_prefix_blocks(table[:2], np.array([33, 64]), 16) == 2  # block 2 holds the newest token of row 0
    assert common_prefix_blocks(table, np.array([1, 60, 60]), 16) == 0


def test_engine_decodes_a_shared_prefix_batch_with_cascade_and_matches_transformers(llama_dir, monkeypatch):
    """16 prompts on one 330-token prefix: their decode steps attend the prefix once (cascade), and
    every greedy token is transformers' argmax."""
    import sageinfer.attention.triton_backend as triton_backend
    from oracle import assert_greedy_matches_hf
    from sageinfer import LLM, SamplingParams

    calls = []
    real = triton_backend.prefix_attention
    monkeypatch.setattr(triton_backend, "prefix_attention",
                        lambda *a, **k: calls.append(int(a[4].item())) or real(*a, **k))
    rng = np.random.default_rng(7)
    prefix = rng.integers(3, 500, size=330).tolist()
    prompts = [prefix + rng.integers(3, 500, size=n).tolist() for n in range(1, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=512, show_progress=False,
              attention_backend="triton", enforce_eager=True)  # eager: the spy sees every step
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.kv_manager.pool.check_accounting()
    assert calls and set(calls) == {320}  # 20 shared blocks of 16, all of them: a multiple of PREFIX_ALIGN
    for p, o in zip(prompts, outs):  # on a GPU, float32 dots run as tf32: allow near-ties there
        assert_greedy_matches_hf(llama_dir, p, o.outputs[0].token_ids, tie_tol=2e-2 if DEVICE == "cuda" else 1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="decode graphs are captured on GPUs only")
def test_cascade_inside_decode_graphs_matches_transformers(llama_dir, monkeypatch):
    """The same 16 prompts with decode steps replayed from CUDA graphs: the graph takes the shared prefix's
    length as an input each replay. The platform is said to have 4 processors, so that 16 sequences x 2 KV
    heads plan one split (as a large batch does on a whole GPU) and the graph keeps its cascade input."""
    from oracle import assert_greedy_matches_hf
    from sageinfer import LLM, SamplingParams
    from sageinfer.executor import graph_runner
    from sageinfer.platforms import get_platform

    monkeypatch.setattr(type(get_platform()), "num_compute_units", lambda self: 4)
    given = []
    replay = graph_runner.DecodeGraphs.run

    def run(self, host, fill_pending):
        out = replay(self, host, fill_pending)
        given.append(int(self.cascade_prefix_len.item()))  # the prefix length this replay read
        return out
    monkeypatch.setattr(graph_runner.DecodeGraphs, "run", run)
    rng = np.random.default_rng(7)
    prefix = rng.integers(3, 500, size=330).tolist()
    prompts = [prefix + rng.integers(3, 500, size=n).tolist() for n in range(1, 17)]
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=512, show_progress=False,
              attention_backend="triton")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.engine.shutdown()
    assert 320 in given, given  # some decode steps replayed a graph with the 320 shared tokens
    for p, o in zip(prompts, outs):  # float32 dots run as tf32 on a GPU: near-ties allowed
        assert_greedy_matches_hf(llama_dir, p, o.outputs[0].token_ids, tie_tol=2e-2)


QUANT_MODES = ["int8", "fp8"]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_cascade_decode_on_a_quantised_cache_matches_reference(mode, q_dtype):
    """(A bf16 query over an FP8 cache takes both kernels' fp16 dots.)"""
    if q_dtype == torch.bfloat16 and mode == "int8" and DEVICE == "cpu":
        pytest.skip("bf16 dots are wrong in the interpreter")
    from sageinfer.attention.backend import KV_MODE
    from sageinfer.attention.torch_ref import write_kv_cache_ref
    store = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[mode]
    page, num_heads, num_kv_heads, head_dim = 16, 8, 2, 32
    context = [256 + n for n in (1, 30, 77, 64)]
    k_full, v_full, meta = random_paged_batch([1] * len(context), context, num_kv_heads, head_dim, page,
                                              torch.float32, seed=21)
    meta.block_table[:, :16] = meta.block_table[0, :16].clone()
    shape = k_full.shape
    scales = (lambda: torch.zeros(shape[:3], device=DEVICE)) if mode == "int8" else (lambda: None)
    cache = LayerKVCache(torch.zeros(shape, dtype=store, device=DEVICE), torch.zeros(shape, dtype=store, device=DEVICE),
                         mode, scales(), scales())
    slots = torch.arange(shape[0] * page, device=DEVICE)
    write_kv_cache_ref(k_full.view(-1, num_kv_heads, head_dim), v_full.view(-1, num_kv_heads, head_dim), cache, slots)
    q = torch.randn(len(context), num_heads, head_dim, device=DEVICE).to(q_dtype)
    ref = paged_attention_ref(q.double(), cache, meta, head_dim ** -0.5)
    prefix_len = torch.tensor([256], dtype=torch.int32, device=DEVICE)
    quant = dict(k_scale=cache.k_scale, v_scale=cache.v_scale, kv_mode=KV_MODE[mode], fp8_scale=cache.fp8_scale)
    parts = prefix_attention(q, cache.k, cache.v, meta.block_table[0], prefix_len, head_dim ** -0.5, 2, SMALL, **quant)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, cache.k, cache.v, out, meta.block_table, meta.seq_lens, meta.query_start_loc, meta.num_seqs,
                    1, head_dim ** -0.5, prefix=(*parts, prefix_len), **quant)
    assert rel_err(out, ref) < (2e-3 if q_dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("kv_mode", [0, 2] + ([1] if DEVICE == "cuda" else []))  # fp8: GPU only
def test_cascade_decode_with_rotary_inside_equals_rope_and_cache_then_cascade(qk_norm, kv_mode):
    """rope=... given to both cascade kernels: each rotates (and q-normalises) its own query rows, the
    decode kernel writes the new k/v; the result must equal ops.rope_cache followed by the cascade."""
    from sageinfer.ops.rope_cache import rope_and_cache
    heads, kv_heads, head_dim, page, dtype = 8, 2, 32, 16, torch.float16
    context_lens = [128 + n for n in (1, 30, 77)] + [0]  # the last row is a graph's padding: slot -1
    k_cache, v_cache, meta = random_paged_batch([1] * 4, context_lens, kv_heads, head_dim, page, dtype, seed=12)
    meta.block_table[:3, :8] = meta.block_table[0, :8].clone()  # 128 shared tokens
    gen = torch.Generator().manual_seed(5)
    q, k, v, rope = decode_step_before_rotary(meta, context_lens, heads, kv_heads, head_dim, page, dtype, gen, qk_norm)
    positions, _, _, cos_sin, slots, q_norm, k_norm, _ = rope
    scales = [torch.rand(k_cache.shape[:3], generator=gen).to(DEVICE) for _ in range(2)] if kv_mode == 2 else [None] * 2
    if kv_mode == 2:
        k_cache, v_cache = [(c.float() * 20).clamp(-127, 127).to(torch.int8) for c in (k_cache, v_cache)]
    elif kv_mode == 1:
        k_cache, v_cache = [c.to(torch.float8_e4m3fn) for c in (k_cache, v_cache)]
    prefix_len = torch.tensor([128], dtype=torch.int32, device=DEVICE)

    def caches():
        return [t.clone() if t is not None else None for t in (k_cache, v_cache, *scales)]

    def cascade(q, kc, vc, ks, vs, out, prefix_rope=None, rope=None):
        quant = dict(k_scale=ks, v_scale=vs, kv_mode=kv_mode)
        parts = prefix_attention(q, kc, vc, meta.block_table[0], prefix_len, head_dim ** -0.5, 2, SMALL,
                                 rope=prefix_rope, **quant)
        paged_attention(q, kc, vc, out, meta.block_table, meta.seq_lens, meta.query_start_loc, 4, 1,
                        head_dim ** -0.5, prefix=(*parts, prefix_len), rope=rope, **quant)
    kc, vc, ks, vs = caches()
    q_rot = rope_and_cache(positions, q.clone(), k, v, cos_sin, kc, vc, slots, q_norm, k_norm, 1e-6,
                           ks, vs, kv_mode)
    ref = torch.empty_like(q)
    cascade(q_rot, kc, vc, ks, vs, ref)
    kc2, vc2, ks2, vs2 = caches()
    out = torch.full_like(q, float("nan"))
    q_before = q.clone()
    cascade(q, kc2, vc2, ks2, vs2, out, prefix_rope=(positions, cos_sin, q_norm, 1e-6), rope=rope)
    assert torch.equal(q, q_before)  # q itself is not rotated in place
    for new, old in ((kc2, kc), (vc2, vc)):  # compared as bytes: fp8 has no equality kernel everywhere
        assert torch.equal(new.view(torch.uint8), old.view(torch.uint8))
    if kv_mode == 2:
        assert torch.allclose(ks2, ks, rtol=1e-5, atol=0) and torch.allclose(vs2, vs, rtol=1e-5, atol=0)
    assert rel_err(out[:3], ref[:3]) < 1e-3
