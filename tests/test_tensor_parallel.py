"""The model split over tensor-parallel ranks (worker processes on gloo, on the CPU) generates what
it does whole."""
import numpy as np
import pytest

from oracle import assert_greedy_matches_hf
from ranks import needs_ranks
from sageinfer import LLM, SamplingParams
from sageinfer.models.model_config import load_model_config

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]  # qwen2: q/k/v biases and tied embeddings; qwen3: q/k norms


def _prompts(seed, lengths=(5, 37, 12)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=n).tolist() for n in lengths]


def _generate(model_dir, prompts, max_tokens, **options):
    """Greedy tokens, and rank 0's layer-0 shard shapes."""
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False, **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    shapes = {"qkv_rows": attn.qkv_proj.weight.shape[0], "o_cols": attn.o_proj.weight.shape[1],
              "kv_cache_heads": llm.engine.runner.kv_caches[0].k.shape[2]}
    llm.engine.shutdown()
    return [o.outputs[0].token_ids for o in outs], shapes


@needs_ranks(2)
@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1_and_transformers(model_dirs, arch):
    model_dir, prompts = model_dirs[arch], _prompts(ARCHS.index(arch))
    tokens, shapes = _generate(model_dir, prompts, 8, tensor_parallel_size=2)
    d = load_model_config(model_dir).head_dim
    assert shapes == {"qkv_rows": (2 + 1 + 1) * d, "o_cols": 2 * d, "kv_cache_heads": 1}  # 2 of 4 q, 1 of 2 kv heads
    assert tokens == _generate(model_dir, prompts, 8)[0]
    for prompt, out in zip(prompts, tokens):
        assert_greedy_matches_hf(model_dir, prompt, out)


@needs_ranks(2)
def test_tp2_one_sequence_on_the_triton_backend(model_dirs):
    """Single-sequence decode takes the one-row matmuls, whose fusions must step aside for the all-reduce."""
    prompts = _prompts(9, (20,))
    tokens, _ = _generate(model_dirs["llama"], prompts, 6, tensor_parallel_size=2, attention_backend="triton")
    assert tokens == _generate(model_dirs["llama"], prompts, 6, attention_backend="triton")[0]


@needs_ranks(4)
def test_tp4_replicates_kv_heads_fewer_than_ranks(model_dirs):
    cfg = load_model_config(model_dirs["llama"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    prompts = _prompts(4)
    tokens, shapes = _generate(model_dirs["llama"], prompts, 8, tensor_parallel_size=4)
    assert shapes == {"qkv_rows": 3 * cfg.head_dim, "o_cols": cfg.head_dim, "kv_cache_heads": 1}
    assert tokens == _generate(model_dirs["llama"], prompts, 8)[0]


def test_heads_that_do_not_split_are_refused():
    from sageinfer.distributed.parallel_state import TensorParallelGroup, kv_head_range
    with pytest.raises(ValueError, match="does not split"):
        TensorParallelGroup(rank=0, size=3).split(4)
    with pytest.raises(ValueError, match="replicated evenly"):
        kv_head_range(2, TensorParallelGroup(rank=0, size=3))
    assert [kv_head_range(2, TensorParallelGroup(rank=r, size=4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


@needs_ranks(2)
def test_engine_with_worker_processes_matches_tp1(model_dirs):
    """LLM(tensor_parallel_size=2): rank 1 in its own process, driven by step messages. Greedy, seeded
    and unseeded sampling (the ranks' random states advance alike), n > 1, penalties, preemptions
    under a small cache, chunked prefill and async scheduling: all as at tp=1."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(21, (5, 80, 33, 120, 2, 64))]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, frequency_penalty=1.0, repetition_penalty=1.3,
                             ignore_eos=True),
              SamplingParams(temperature=1.0, n=3, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0, max_tokens=40, min_tokens=3, stop_token_ids=[7, 11, 13]),
              SamplingParams(temperature=0.7, top_k=5, max_tokens=18, ignore_eos=True)]
    options = dict(dtype="float32", num_gpu_blocks_override=16, block_size=16, max_model_len=200,
                   max_num_batched_tokens=24, admission_lookahead_tokens=0, show_progress=False)

    def run(**extra):
        llm = LLM(model_dirs["qwen3"], **options, **extra)
        outs = llm.generate(prompts, params, use_tqdm=False)
        preemptions = llm.engine.scheduler.num_preemptions
        llm.engine.shutdown()
        return [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs], preemptions

    sharded, preemptions = run(tensor_parallel_size=2)
    whole, _ = run()
    assert preemptions > 0
    assert sharded == whole


@needs_ranks(2)
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_dummy_weights_are_one_model_at_every_tp_size(model_dirs, arch):
    """load_format='dummy' draws each checkpoint tensor whole and shards it like real weights, so
    benchmarks at different tp sizes run the same model: same logprobs, same tokens."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(31, (7, 50))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)

    def run(**options):
        llm = LLM(model_dirs[arch], dtype="float32", num_gpu_blocks_override=128, load_format="dummy",
                  show_progress=False, **options)
        outs = llm.generate(prompts, params, use_tqdm=False)
        llm.engine.shutdown()
        return ([o.outputs[0].token_ids for o in outs],
                [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs])

    tokens1, logprobs1 = run()
    tokens2, logprobs2 = run(tensor_parallel_size=2)
    assert tokens2 == tokens1
    np.testing.assert_allclose(np.array(logprobs2), np.array(logprobs1), rtol=0, atol=1e-5)
    other_seed = LLM(model_dirs[arch], dtype="float32", num_gpu_blocks_override=128, load_format="dummy", seed=1,
                     show_progress=False).generate(prompts, params, use_tqdm=False)
    assert [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
            for o in other_seed] != logprobs1  # the seed picks the weights


@needs_ranks(2)
def test_ranks_as_ray_actors_on_a_local_head(model_dirs):
    """distributed_executor_backend='ray': rank 1 is a Ray actor (a local head here), steps and the
    rendezvous over TCP; the same tokens as the process backend."""
    ray = pytest.importorskip("ray", reason="Ray is not installed")
    prompts = _prompts(17, (9, 40))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    try:
        llm = LLM(model_dirs["qwen3"], dtype="float32", num_gpu_blocks_override=256, tensor_parallel_size=2,
                  distributed_executor_backend="ray", show_progress=False)
        assert type(llm.engine.workers.ranks).__name__ == "RayRanks"
        assert llm.engine.workers.init_method.startswith("tcp://")
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.shutdown()
        assert [o.outputs[0].token_ids for o in outs] == _generate(model_dirs["qwen3"], prompts, 8,
                                                                   tensor_parallel_size=2)[0]
    finally:
        ray.shutdown()
