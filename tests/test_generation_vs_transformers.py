"""Greedy generation equals transformers' argmax, for every architecture and scheduling regime."""
import numpy as np
import pytest

from sageinfer import LLM, SamplingParams
from oracle import assert_greedy_matches_hf

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENS = [1, 7, 33, 150, 300]


def _prompts(lengths, seed=0, vocab=500):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _generate(model_dir, prompts, max_tokens=12, **kwargs):
    kwargs.setdefault("num_gpu_blocks_override", 512)
    llm = LLM(model_dir, dtype="float32", show_progress=False, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.kv_manager.pool.check_accounting()
    return llm, outs


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_of_mixed_lengths_matches_transformers(model_dirs, arch):
    prompts = _prompts(PROMPT_LENS, seed=ARCHS.index(arch))
    _, outs = _generate(model_dirs[arch], prompts)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"
        assert_greedy_matches_hf(model_dirs[arch], prompt, out.outputs[0].token_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_chunked_prefill_matches_transformers(model_dirs, arch):
    prompts = _prompts(PROMPT_LENS, seed=10)
    llm, outs = _generate(model_dirs[arch], prompts, max_num_batched_tokens=13, enable_prefix_caching=False)
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dirs[arch], prompt, out.outputs[0].token_ids)


def test_preemption_under_tiny_kv_cache_keeps_output_correct(model_dirs):
    model_dir = model_dirs["qwen2"]
    prompts = _prompts([40, 60, 80, 100, 120, 30], seed=11)
    # 19 usable blocks of 16 tokens = 304 tokens for ~430 prompt + 6*24 output tokens: must preempt.
    llm, outs = _generate(model_dir, prompts, max_tokens=24, num_gpu_blocks_override=20, block_size=16, max_model_len=256,
                          enable_prefix_caching=False, admission_lookahead_tokens=0)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert len(out.outputs[0].token_ids) == 24
        assert_greedy_matches_hf(model_dir, prompt, out.outputs[0].token_ids)


def test_preemption_with_prefix_caching_keeps_output_correct(model_dirs):
    model_dir = model_dirs["llama"]
    prompts = _prompts([40, 60, 80, 100, 120, 30], seed=12)
    llm, outs = _generate(model_dir, prompts, max_tokens=24, num_gpu_blocks_override=20, block_size=16, max_model_len=256,
                          max_num_batched_tokens=64, admission_lookahead_tokens=0)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dir, prompt, out.outputs[0].token_ids)


def test_requests_arriving_while_others_run_are_correct(model_dirs):
    model_dir = model_dirs["mistral"]
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=512, max_num_batched_tokens=40,
              show_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = _prompts([50, 5, 90, 17, 64], seed=13)
    finished = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or llm.engine.has_unfinished_requests():
        if pending and steps % 3 == 0:  # a new request every third step
            i, prompt = pending.pop(0)
            llm.engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        for out in llm.engine.step():
            if out.finished:
                finished[int(out.request_id)] = out
        steps += 1
    assert sorted(finished) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        assert_greedy_matches_hf(model_dir, prompt, finished[i].outputs[0].token_ids)
    llm.engine.kv_manager.pool.check_accounting()
    assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.pool.usable_blocks


def test_no_chunked_prefill_matches_transformers(model_dirs):
    model_dir = model_dirs["qwen3"]
    prompts = _prompts([3, 200, 45], seed=14)
    _, outs = _generate(model_dir, prompts, enable_chunked_prefill=False, max_num_batched_tokens=256,
                        max_model_len=256)
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dir, prompt, out.outputs[0].token_ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_path_matches_transformers(model_dirs, arch):
    """The whole Triton path (fused norms, rope+cache write, paged attention) in the interpreter."""
    prompts = _prompts([1, 20, 45], seed=15)
    llm, outs = _generate(model_dirs[arch], prompts, max_tokens=6, attention_backend="triton",
                          max_num_batched_tokens=32)
    assert llm.engine.runner.backend.name == "triton"
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dirs[arch], prompt, out.outputs[0].token_ids)


def test_triton_path_with_page_aligned_prefill_matches_transformers(model_dirs, monkeypatch):
    """Pages of 128 tokens take the page-aligned prefill kernel, chunked across page boundaries."""
    from sageinfer.ops import prefill_attention as tile_prefill
    calls = []
    original = tile_prefill.prefill_attention
    monkeypatch.setattr(tile_prefill, "prefill_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    prompts = _prompts([3, 150, 290], seed=16)
    llm, outs = _generate(model_dirs["qwen3"], prompts, max_tokens=5, attention_backend="triton", block_size=128,
                          num_gpu_blocks_override=16, max_num_batched_tokens=100)
    assert calls, "the page-aligned prefill kernel was not used"
    for prompt, out in zip(prompts, outs):
        assert_greedy_matches_hf(model_dirs["qwen3"], prompt, out.outputs[0].token_ids)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_single_stream_decode_with_folded_norms_matches_transformers(model_dirs, arch, monkeypatch):
    """One sequence decodes through the one-row matmuls that fold the residual add and RMSNorm in."""
    from sageinfer.ops import gemv as gemv_module
    folded = []
    original = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: (
        folded.append(k.get("norm_weight") is not None or k.get("residual") is not None) or original(*a, **k)))
    prompt = _prompts([9], seed=17)[0]
    _, outs = _generate(model_dirs[arch], [prompt], max_tokens=4, attention_backend="triton")
    assert sum(folded) >= 4 * 4, "decode steps did not fold norms into the matmuls"
    assert_greedy_matches_hf(model_dirs[arch], prompt, outs[0].outputs[0].token_ids)


def test_single_stream_mlp_activates_in_gate_up_where_down_reads_words(model_dirs, monkeypatch):
    """A 16-bit model's one-row down projection reads its weights as words (ops/gemv_words.py), so the
    gate_up matmul hands out silu(gate) * up and down takes a plain input; a float32 model's down forms
    the activation itself. The 16-bit model decodes the same tokens, with close log-probabilities, when
    forced to the other order (SAGEINFER_ONE_ROW_ACTIVATE=0)."""
    from sageinfer.layers import linear as linear_layers
    from sageinfer.ops import gemv as gemv_module
    calls, original = [], gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **k: (calls.append(k), original(*a, **k))[1])
    prompt = _prompts([9], seed=19)[0]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=0)
    outs = {}
    for dtype, forced in (("float16", None), ("float16", False), ("float32", None)):
        monkeypatch.setattr(linear_layers, "ONE_ROW_ACTIVATE", forced)
        calls.clear()
        llm = LLM(model_dirs["qwen3"], dtype=dtype, num_gpu_blocks_override=128, attention_backend="triton",
                  show_progress=False)
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
        llm.engine.shutdown()
        outs[dtype, forced] = (out.token_ids, [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)])
        activates = dtype == "float16" and forced is None
        assert any(k.get("activate") for k in calls) == activates
        assert any(k.get("gated") for k in calls) != activates
    assert outs["float16", None][0] == outs["float16", False][0]
    np.testing.assert_allclose(outs["float16", None][1], outs["float16", False][1], atol=2e-2)
