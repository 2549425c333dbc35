"""Offload tier: evicted prefix blocks come back from host memory instead of being recomputed."""
import numpy as np
import pytest
import torch

from ranks import needs_ranks
from sageinfer import LLM, SamplingParams


def _run_sequence(model_dir, offload_gb, **options):
    rng = np.random.default_rng(41)
    prefix = rng.integers(3, 500, size=200).tolist()
    first = prefix + rng.integers(3, 500, size=30).tolist()
    fillers = [rng.integers(3, 500, size=150).tolist() for _ in range(3)]
    again = prefix + rng.integers(3, 500, size=40).tolist()
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=24, block_size=16, max_model_len=300, show_progress=False,
              kv_offload_gb=offload_gb, **options)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in [first] + fillers]
    before = llm.engine.num_prompt_tokens_computed
    last = llm.generate({"prompt_token_ids": again}, params, use_tqdm=False)[0]
    llm.engine.kv_manager.pool.check_accounting()
    return llm, outs + [last], llm.engine.num_prompt_tokens_computed - before, len(again)


def test_evicted_prefix_comes_back_from_host_and_output_is_unchanged(llama_dir):
    plain, plain_outs, plain_computed, n = _run_sequence(llama_dir, 0.0)
    offload, offload_outs, offload_computed, _ = _run_sequence(llama_dir, 1 / 1024)  # 1 MiB of host memory
    assert plain.engine.kv_manager.pool.evictions > 0
    # Without the tier the shared 200-token prefix was evicted and is prefilled again ...
    assert plain_outs[-1].num_cached_tokens == 0 and plain_computed == n
    # ... with it, its 12 full blocks come back from host memory.
    connector = offload.engine.kv_manager.connector
    assert offload_outs[-1].num_cached_tokens == 192 and offload_computed == n - 192
    assert connector.loaded_blocks == 12 and connector.saved_blocks >= 12
    assert [o.outputs[0].token_ids for o in offload_outs] == [o.outputs[0].token_ids for o in plain_outs]


def test_offload_needs_prefix_caching(llama_dir):
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        LLM(llama_dir, num_gpu_blocks_override=64, enable_prefix_caching=False, kv_offload_gb=0.01,
            show_progress=False)


def _load_count(model_dir, num_requests):
    rng = np.random.default_rng(43)
    prefix = rng.integers(3, 500, size=96).tolist()
    llm = LLM(model_dir, dtype="float32", num_gpu_blocks_override=20, block_size=16, max_model_len=300, show_progress=False,
              kv_offload_gb=1 / 1024)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": prefix + [7, 8]}, params, use_tqdm=False)
    llm.generate({"prompt_token_ids": rng.integers(3, 500, size=250).tolist()}, params, use_tqdm=False)  # evicts
    outs = llm.generate([{"prompt_token_ids": prefix + [9 + i]} for i in range(num_requests)], params,
                        use_tqdm=False)
    assert all(o.num_cached_tokens == 96 for o in outs)
    llm.engine.kv_manager.pool.check_accounting()
    return llm.engine.kv_manager.connector.loaded_blocks


def test_requests_admitted_together_load_an_offloaded_prefix_once(llama_dir):
    alone = _load_count(llama_dir, 1)
    assert alone > 0
    assert _load_count(llama_dir, 3) == alone  # the other two share the loaded blocks


def test_connector_moves_blocks_in_runs_and_survives_a_batch_larger_than_the_host_pool():
    """Blocks round-trip exactly (values and int8 scales), in runs of consecutive host slots, also
    when one save holds more blocks than the pool (the oldest of the batch give way)."""
    from sageinfer.attention.backend import LayerKVCache
    from sageinfer.platforms.cpu import CpuPlatform
    from sageinfer.transport.host_offload import HostOffloadConnector

    gen = torch.Generator().manual_seed(0)
    caches = [LayerKVCache(torch.randint(-127, 127, (12, 4, 2, 8), generator=gen, dtype=torch.int8),
                           torch.randint(-127, 127, (12, 4, 2, 8), generator=gen, dtype=torch.int8), "int8",
                           torch.rand(12, 4, 2, generator=gen), torch.rand(12, 4, 2, generator=gen))
              for _ in range(3)]
    original = [[t.clone() for t in (c.k, c.v, c.k_scale, c.v_scale)] for c in caches]
    conn = HostOffloadConnector(caches, 4, CpuPlatform())
    conn.save([101, 102, 103], [5, 2, 9], protected=set())
    conn.save([104, 105, 106], [1, 7, 3], protected=set())  # needs 2 slots held by 101 and 102
    assert conn.contains_prefix([103, 104, 105, 106]) == 4 and conn.contains_prefix([101]) == 0
    conn.load([106, 103, 105, 104], [10, 11, 4, 8])
    for layer, cache in enumerate(caches):
        for now, before in zip((cache.k, cache.v, cache.k_scale, cache.v_scale), original[layer]):
            assert torch.equal(now[[10, 11, 4, 8]], before[[3, 9, 7, 1]])
    conn2 = HostOffloadConnector(caches, 2, CpuPlatform())
    conn2.save([1, 2, 3], [1, 2, 3], protected=set())  # one batch over the pool: 1's slot goes to 3
    assert conn2.contains_prefix([2]) == 1 and conn2.contains_prefix([3]) == 1 and conn2.contains_prefix([1]) == 0
    conn2.load([3, 2], [6, 5])
    assert torch.equal(caches[0].k[6], caches[0].k[3]) and torch.equal(caches[0].k[5], caches[0].k[2])


def test_saves_of_blocks_freed_during_a_launched_step_wait_for_it():
    """A block freed after the last launch (an aborted prefill chunk, a finished request's wasted
    token) may still be written by that step: its save is ordered after the launched work."""
    from sageinfer.engine.request import Request
    from sageinfer.kv_cache.manager import KVCacheManager

    class Recorder:
        def __init__(self):
            self.calls = []

        def contains_prefix(self, keys):
            return 0

        def save(self, keys, block_ids, protected, after_launched=False):
            self.calls.append((sorted(block_ids), after_launched))

        def load(self, keys, block_ids):
            pass

    def run(free_before_launch: bool):
        recorder = Recorder()
        kv = KVCacheManager(5, 4, enable_caching=True, connector=recorder)
        a = Request("a", "a", 0, list(range(16)), SamplingParams(), set())
        assert kv.allocate_slots(a, 16)
        kv.cache_full_blocks(a, 16)
        if free_before_launch:
            kv.free(a)
            kv.step_launched()
        else:
            kv.step_launched()
            kv.free(a)  # e.g. aborted while the step that computes its chunk is in flight
        b = Request("b", "b", 0, [99] * 16, SamplingParams(), set())
        assert kv.allocate_slots(b, 16)  # evicts all of a's cached blocks
        kv.flush_transfers()
        return recorder.calls

    assert run(free_before_launch=False) == [([1, 2, 3, 4], True)]
    assert run(free_before_launch=True) == [([1, 2, 3, 4], False)]


@needs_ranks(2)
def test_offload_at_tensor_parallel_size_2(model_dirs):
    """Each rank keeps its shard of the offloaded blocks; the other ranks replay rank 0's copies (from
    the step messages): the evicted prefix comes back from host memory on both, outputs as at tp=1."""
    _, expected, _, n = _run_sequence(model_dirs["llama"], 1 / 1024)
    sharded, outs, computed, _ = _run_sequence(model_dirs["llama"], 1 / 1024, tensor_parallel_size=2)
    assert outs[-1].num_cached_tokens == 192 and computed == n - 192
    assert sharded.engine.kv_manager.connector.loaded_blocks == 12
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    sharded.engine.shutdown()
