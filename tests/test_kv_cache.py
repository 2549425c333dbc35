"""Block pool accounting and prefix caching."""
import numpy as np
import pytest

from sageinfer import LLM, SamplingParams
from sageinfer.engine.request import Request
from sageinfer.kv_cache.block_pool import BlockPool
from sageinfer.kv_cache.manager import KVCacheManager


def _request(ids, rid="r"):
    return Request(rid, rid, 0, list(ids), SamplingParams(), set())


def test_freed_blocks_return_to_the_pool_and_double_free_raises():
    pool = BlockPool(8, enable_caching=True)
    ids = pool.allocate(3)
    assert pool.num_free_blocks == 4 and 0 not in ids
    pool.free(ids)
    pool.check_accounting()
    assert pool.num_free_blocks == 7
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([ids[0]])


def test_allocation_beyond_free_blocks_is_refused_without_change():
    kv = KVCacheManager(5, 4, enable_caching=False)
    req = _request(range(20))
    assert not kv.allocate_slots(req, 20)
    assert req.block_ids == [] and kv.pool.num_free_blocks == 4
    assert kv.allocate_slots(req, 16)
    assert len(req.block_ids) == 4


def test_full_blocks_are_found_again_by_an_equal_prefix():
    kv = KVCacheManager(16, 4, enable_caching=True)
    first = _request(range(10))
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_full_blocks(first)
    kv.free(first)
    second = _request(list(range(8)) + [99, 98, 97])
    hit = kv.get_computed_blocks(second)
    assert hit.num_tokens == 8 and hit.blocks == first_blocks_prefix(kv, 2)
    other = _request([1] + list(range(1, 11)))
    assert kv.get_computed_blocks(other).num_tokens == 0


def first_blocks_prefix(kv, n):
    return [kv.pool.cached[h] for h in list(kv.pool.cached)[:n]]


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(16, 4, enable_caching=True)
    first = _request(range(8))
    kv.allocate_slots(first, 8)
    first.num_computed_tokens = 8
    kv.cache_full_blocks(first)
    kv.free(first)
    assert kv.get_computed_blocks(_request(range(8))).num_tokens == 4


def test_eviction_reuses_least_recently_freed_blocks_leaves_first():
    kv = KVCacheManager(5, 2, enable_caching=True)
    a = _request(range(8), "a")
    kv.allocate_slots(a, 8)
    a_block_ids = list(a.block_ids)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    kv.free(a)  # freed tail first: block of tokens 6-7 is evicted first
    b = _request([50, 51], "b")
    kv.allocate_slots(b, 2)
    assert b.block_ids == [a_block_ids[-1]]  # the leaf went first
    assert kv.get_computed_blocks(_request(list(range(8)) + [1], "c")).num_tokens == 6  # the parents survive


def _prompts(lengths, seed, prefix):
    rng = np.random.default_rng(seed)
    return [prefix + rng.integers(3, 500, size=n).tolist() for n in lengths]


def test_shared_prefix_is_prefilled_once_and_outputs_are_unchanged(llama_dir):
    prefix = np.random.default_rng(1).integers(3, 500, size=200).tolist()
    prompts = _prompts([30, 45], seed=2, prefix=prefix)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cached = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False)
    plain = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, enable_prefix_caching=False,
                show_progress=False)
    first = cached.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)[0]
    before = cached.engine.num_prompt_tokens_computed
    second = cached.generate({"prompt_token_ids": prompts[1]}, params, use_tqdm=False)[0]
    # 200 shared tokens = 12 full blocks of 16 (192 tokens) come from the cache.
    assert second.num_cached_tokens == 192
    assert cached.engine.num_prompt_tokens_computed - before == len(prompts[1]) - 192
    expected = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == [e.outputs[0].token_ids for e in expected]
    assert cached.engine.get_stats().prefix_cache_hit_rate == pytest.approx(192 / (len(prompts[0]) + len(prompts[1])))
    cached.engine.kv_manager.pool.check_accounting()


def test_eviction_under_memory_pressure_keeps_outputs_correct(llama_dir):
    prompts = _prompts([40, 70, 20, 90, 55, 33], seed=3, prefix=list(range(3, 35)))
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    small = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=18, block_size=16, max_model_len=200,
                max_num_batched_tokens=48, show_progress=False)
    big = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=512, enable_prefix_caching=False,
              show_progress=False)
    outs = [small.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts[:2]]
    outs += small.generate([{"prompt_token_ids": p} for p in prompts[2:]], params, use_tqdm=False)
    ref = big.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in ref]
    assert small.engine.kv_manager.pool.evictions > 0
    small.engine.kv_manager.pool.check_accounting()
    assert small.engine.kv_manager.pool.num_free_blocks == small.engine.kv_manager.pool.usable_blocks


def test_requests_admitted_together_compute_their_common_prefix_once(llama_dir):
    """Blocks are findable once scheduled: the second of three prompts arriving together hits the
    first's prefix in the same step, and the outputs equal those without caching."""
    prefix = np.random.default_rng(4).integers(3, 500, size=200).tolist()
    prompts = _prompts([30, 45, 12], seed=5, prefix=prefix)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cached = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False)
    plain = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, enable_prefix_caching=False,
                show_progress=False)
    outs = cached.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 192, 192]
    assert cached.engine.num_prompt_tokens_computed == sum(len(p) for p in prompts) - 2 * 192
    expected = plain.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [e.outputs[0].token_ids for e in expected]
    cached.engine.kv_manager.pool.check_accounting()


def _simulate(num_blocks, lookahead, prompts=6, prompt_len=40, out_len=24):
    """Drive the scheduler alone (every scheduled token computed, one token sampled per finished
    prefill/decode); returns (preemptions, prompt tokens computed, max running)."""
    from sageinfer.config import EngineConfig
    from sageinfer.engine.scheduler import Scheduler
    config = EngineConfig(model="unused", max_num_seqs=64, max_num_batched_tokens=512,
                          admission_lookahead_tokens=lookahead)
    config.max_model_len = 512
    kv = KVCacheManager(num_blocks, 4, enable_caching=False)
    sched = Scheduler(config, kv)
    rng = np.random.default_rng(0)
    for i in range(prompts):
        r = Request(f"r{i}", f"r{i}", 0, rng.integers(3, 500, size=prompt_len).tolist(),
                    SamplingParams(max_tokens=out_len, ignore_eos=True), set())
        r.max_output_tokens = out_len
        sched.add_request(r)
    computed, max_running = 0, 0
    while sched.has_unfinished():
        out = sched.schedule()
        max_running = max(max_running, len(sched.running))
        sched.update_after_step(out)
        for r, n in out.scheduled:
            if r.num_computed_tokens <= r.num_prompt_tokens or n > 1:
                computed += n
            if r.num_computed_tokens == r.num_tokens:
                r.resolve_placeholder(r.append_placeholder(0), 7)
                if r.num_output_tokens >= out_len:
                    sched.finish(r, "length")
        kv.pool.check_accounting()
    return sched.num_preemptions, computed, max_running


def test_admission_keeps_room_for_running_requests_to_grow():
    """64 tokens of prompt+output per request, 30 blocks of 4 tokens: greedy admission runs all six
    prompts at once and must preempt; with the lookahead it runs fewer at once, never preempts and
    computes each prompt exactly once."""
    greedy = _simulate(31, lookahead=0)
    reserved = _simulate(31, lookahead=256)
    assert greedy[0] > 0 and greedy[1] > 6 * 40
    assert reserved[0] == 0 and reserved[1] == 6 * 40
    assert reserved[2] < greedy[2]
    # A single request whose growth exceeds the cache is still admitted when nothing else runs.
    assert _simulate(20, lookahead=256, prompts=1, prompt_len=60, out_len=10)[0] == 0


def test_prefix_keys_are_chained_sha256_that_any_process_recomputes():
    import subprocess
    import sys
    from sageinfer.kv_cache.manager import hash_block
    first = hash_block(None, [1, 2, 3, 4])
    second = hash_block(first, [5, 6, 7, 8])
    assert len(first) == len(second) == 32
    assert hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8]) != second  # same block, other prefix
    code = ("from sageinfer.kv_cache.manager import hash_block as h; "
            "print(h(h(None, [1, 2, 3, 4]), [5, 6, 7, 8]).hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert other.stdout.strip() == second.hex()


def test_hashes_of_a_run_of_blocks_chain_hash_block():
    """hash_blocks packs the tokens once: the same keys as hash_block a block at a time, from a given
    parent, the trailing partial block left out."""
    from sageinfer.kv_cache.manager import hash_block, hash_blocks
    tokens = list(range(1000, 1000 + 70))
    expected, parent = [], b"p" * 32
    for start in range(0, 64, 16):
        parent = hash_block(parent, tokens[start:start + 16])
        expected.append(parent)
    assert hash_blocks(b"p" * 32, tokens, 16) == expected
    assert hash_blocks(None, tokens[:16], 16) == [hash_block(None, tokens[:16])]
    assert hash_blocks(None, tokens[:15], 16) == []


def test_without_a_kv_budget_the_memory_profile_runs_and_sizes_the_cache(llama_dir, monkeypatch):
    """GPUs size the KV cache by profiling the largest batch (CPUs have a fixed budget): the profile
    run goes through the same step path as requests, grammar rows and all."""
    from sageinfer.platforms.cpu import CpuPlatform
    monkeypatch.setattr(CpuPlatform, "default_kv_cache_bytes", lambda self: None)
    monkeypatch.setattr(CpuPlatform, "mem_get_info", lambda self: (1 << 30, 1 << 30))
    llm = LLM(llama_dir, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=256,
              gpu_memory_utilization=0.5, show_progress=False)
    per_block = llm.engine.runner.kv_bytes_per_block()
    if llm.engine.platform.name == "cpu":
        assert llm.engine.num_kv_blocks == (1 << 29) // per_block  # half of the "device"
    else:  # a real device: its own profile, the same path
        assert llm.engine.num_kv_blocks * per_block > 256 * per_block / llm.engine.config.block_size
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_reset_prefix_cache_forgets_prefixes_only_when_nothing_is_in_flight(llama_dir):
    prompt = {"prompt_token_ids": _prompts([150], seed=5, prefix=[])[0]}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    block = llm.engine.config.block_size  # the platform's (16 on the CPU: 9 full blocks)
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 149 // block * block
    llm.engine.add_request("busy", prompt, params)
    assert llm.reset_prefix_cache() is False  # a request holds blocks: nothing forgotten
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache() is True
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    llm.engine.kv_manager.pool.check_accounting()


def test_a_cache_too_small_for_max_model_len_fails_start_up_and_cancels_the_warm_up(llama_dir, monkeypatch):
    from sageinfer.executor.model_runner import ModelRunner
    finished = []

    def start(self, attention=True, linear=True):  # a background warm-up as on a GPU, recording how it is finished
        self._finish_kernel_warm_up = finished.append
    monkeypatch.setattr(ModelRunner, "start_kernel_warm_up", start)
    with pytest.raises(ValueError, match=r"fewer than max_model_len \(256\): lower max_model_len .*"
                                         r"gpu_memory_utilization, now 0.9.*kv_cache_dtype=fp8 or int8 halves"):
        LLM(llama_dir, dtype="float32", max_model_len=256, block_size=16, num_gpu_blocks_override=8,
            show_progress=False)  # 128 tokens of cache on every platform (CUDA's default block is 64)
    assert finished == [True]  # cancelled, not left compiling past the failed start
