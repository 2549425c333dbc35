"""Decode graphs of one batch size planned several ways (attention backend's decode_graph_variants): a
step replays the graph whose plan suits its lengths and shared prefix, not always the plan made for
max_model_len."""
import types

import numpy as np
import torch

from sageinfer import LLM
from sageinfer.attention import triton_backend
from sageinfer.attention.backend import AttentionBackend
from sageinfer.attention.triton_backend import TritonBackend
from sageinfer.executor.graph_runner import DecodeGraphs


def test_large_batches_get_a_one_split_graph_beside_the_ragged_one():
    backend = TritonBackend(num_sms=132)
    keys = triton_backend.RAGGED_MIN_KEYS
    assert backend.decode_graph_variants(256, 8, 40960) == [(keys, False), (keys, True), (40960, True)]
    assert backend.decode_graph_variants(8, 8, 40960) == [(40960, True)]  # split by occupancy: one plan
    assert backend.decode_graph_variants(256, 8, keys) == [(keys, True)]  # never longer than the ragged bound
    assert AttentionBackend().decode_graph_variants(256, 8, 40960) == [(40960, True)]


def test_the_choice_follows_the_lengths_and_the_shared_prefix():
    backend = TritonBackend(num_sms=132)
    variants = backend.decode_graph_variants(256, 8, 40960)

    def choice(lengths, prefix=0, kv_heads=8):
        return variants[backend.decode_graph_choice(variants, np.array(lengths), prefix, kv_heads)]
    even = [680] * 256
    assert choice(even) == (1024, False) and choice(even, prefix=512) == (1024, True)
    assert choice([1100 + i for i in range(256)]) == (1024, False)  # long but even and filling the GPU
    assert choice([500] * 255 + [8000]) == (40960, True)  # one long sequence: ragged splits
    assert choice([4000] * 32) == (40960, True)  # even, but 32 x 8 programs leave the GPU half idle
    assert choice([1000] * 255 + [1024], prefix=512) == (1024, True)  # at most RAGGED_MIN_KEYS: never ragged


class _Graph:
    replayed = []

    def __init__(self):
        self.key = None

    def replay(self):
        _Graph.replayed.append(self.key)


def test_a_step_replays_the_chosen_graph_with_the_prefix_input_only_where_offered(model_dirs, monkeypatch):
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=80,
              max_model_len=1024, max_num_seqs=8, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    # 8 sequences x 2 KV heads need no splits to cover 12 processors: the graph of 8 has three variants; the
    # graph of 4 splits by occupancy. Seven sequences fill the processors at one program each.
    runner.backend.num_sms = 12
    monkeypatch.setattr(triton_backend, "DECODE_PROGRAMS_PER_SM", 1)
    copies = []
    platform = types.SimpleNamespace(
        graph_pool_handle=lambda: None, supports_dependent_launch=lambda: False, graph_class=lambda: _Graph,
        synchronize=lambda: None, graph_context=lambda graph, pool=None: _nothing(),
        copy_to_device=lambda dst, src: copies.append(np.array(src)))
    graphs = DecodeGraphs(runner.model, runner.backend, platform, runner.device, 8, 1024, runner.block_size,
                          runner.num_kv_heads, runner.kv_caches)
    assert graphs.variants[8] == [(32, False), (32, True), (1024, True)] and graphs.variants[4] == [(1024, True)]
    for key, graph in graphs.graphs.items():
        graph.key = key
    assert graphs.cascade_keys == {(8, 32, True)}  # the ragged plan drops the prefix input

    def step(seq_lens, prefix):
        _Graph.replayed.clear(), copies.clear()
        host = types.SimpleNamespace(num_tokens=len(seq_lens), input_ids=np.zeros(len(seq_lens)),
                                     positions=np.array(seq_lens) - 1, slot_mapping=np.zeros(len(seq_lens)),
                                     seq_lens=np.array(seq_lens), cascade_prefix_len=prefix,
                                     block_table=np.zeros((len(seq_lens), 1), dtype=np.int32))
        graphs.run(host, lambda ids: None)
        return _Graph.replayed[0], int(copies[1][-1])  # the graph, the prefix length it was given
    assert step([40] * 7, 0) == ((8, 32, False), 0)
    assert step([40] * 7, 16) == ((8, 32, True), 16)
    assert step([20] * 6 + [300], 16) == ((8, 1024, True), 0)
    assert step([20, 20, 20], 16) == ((4, 1024, True), 0)  # one variant, planned with splits: no prefix


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
