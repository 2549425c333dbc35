"""Decode graphs of one batch size planned several ways (attention backend's decode_graph_variants): a
step replays the graph whose plan suits its lengths and shared prefix, not always the plan made for
max_model_len."""
import contextlib
import types

import numpy as np
import pytest
import torch

from sageinfer import LLM
from sageinfer.attention import triton_backend
from sageinfer.attention.backend import AttentionBackend
from sageinfer.attention.triton_backend import TritonBackend
from sageinfer.executor import graph_runner


def test_large_batches_get_one_split_graphs_beside_the_ragged_one(monkeypatch):
    backend = TritonBackend(num_sms=132)
    keys = triton_backend.RAGGED_MIN_KEYS
    assert backend.decode_graph_variants(256, 8, 40960) == [(keys, True), (40960, True)]
    monkeypatch.setattr(triton_backend, "EVEN_DECODE_GRAPHS", 2)
    assert backend.decode_graph_variants(256, 8, 40960) == [(keys, False), (keys, True), (40960, True)]
    assert backend.decode_graph_variants(8, 8, 40960) == [(40960, True)]  # split by occupancy: one plan
    assert backend.decode_graph_variants(256, 8, keys) == [(keys, True)]  # never longer than the ragged bound
    monkeypatch.setattr(triton_backend, "EVEN_DECODE_GRAPHS", 0)
    assert backend.decode_graph_variants(256, 8, 40960) == [(40960, True)]
    assert AttentionBackend().decode_graph_variants(256, 8, 40960) == [(40960, True)]


@pytest.mark.parametrize("graphs", [1, 2])
def test_the_choice_follows_the_lengths_and_the_shared_prefix(monkeypatch, graphs):
    monkeypatch.setattr(triton_backend, "EVEN_DECODE_GRAPHS", graphs)
    backend = TritonBackend(num_sms=132)
    variants = backend.decode_graph_variants(256, 8, 40960)

    def choice(lengths, prefix=0, kv_heads=8):
        return variants[backend.decode_graph_choice(variants, np.array(lengths), prefix, kv_heads)]
    even = [680] * 256
    # Without a prefix: the one-split graph without the prefix input, else the one that takes length 0.
    assert choice(even) == ((1024, False) if graphs == 2 else (1024, True)) and choice(even, prefix=512) == (1024, True)
    assert choice([1100 + i for i in range(256)], prefix=64) == (1024, True)  # long but even and filling the GPU
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
    monkeypatch.setattr(triton_backend, "EVEN_DECODE_GRAPHS", 2)
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=80,
              max_model_len=1024, max_num_seqs=8, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    # 2 to 8 sequences x 2 KV heads need no splits to cover 4 processors (one program each): their plan is
    # ragged and has variants, which only the graph of 8 holds; one sequence splits by occupancy.
    runner.backend.num_sms = 4
    monkeypatch.setattr(triton_backend, "DECODE_PROGRAMS_PER_SM", 1)
    monkeypatch.setattr(graph_runner, "VARIANT_SIZES_EVERY", 8)
    copies = []
    platform = types.SimpleNamespace(
        graph_pool_handle=lambda: None, supports_dependent_launch=lambda: False, graph_class=lambda: _Graph,
        synchronize=lambda: None, graph_context=lambda graph, pool=None: contextlib.nullcontext(),
        copy_to_device=lambda dst, src: copies.append(np.array(src)))
    graphs = graph_runner.DecodeGraphs(runner.model, runner.backend, platform, runner.device, 8, 1024,
                                       runner.block_size, runner.num_kv_heads, runner.kv_caches)
    assert graphs.variants == {1: [(1024, True)], 2: [(1024, True)], 4: [(1024, True)],
                               8: [(32, False), (32, True), (1024, True)]}
    assert graphs.variant_size == {2: 8, 4: 8, 8: 8}
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
    assert step([40] * 3, 0) == ((8, 32, False), 0)  # the graph of 8's one split, padded
    assert step([20] * 3 + [300], 16) == ((4, 1024, True), 0)  # ragged: its own size
    assert step([20], 16) == ((1, 1024, True), 0)  # one variant, planned with splits: no prefix


def test_eager_and_mixed_steps_plan_one_split_for_even_lengths_they_know(monkeypatch):
    from sageinfer.attention.backend import AttentionMetadata
    backend = TritonBackend(num_sms=132)

    def planned(lengths, max_seq_len=None, query_lens=None):
        query_lens = query_lens or [1] * len(lengths)
        starts = np.concatenate([[0], np.cumsum(query_lens)]).tolist()
        meta = AttentionMetadata(sum(query_lens), torch.zeros(starts[-1]), torch.tensor(starts),
                                 torch.tensor(lengths), torch.zeros(len(lengths), 1), max_query_len=max(query_lens),
                                 max_seq_len=max_seq_len or max(lengths), query_start_loc_cpu=starts,
                                 seq_lens_cpu=list(lengths))
        backend.plan(meta, 8)
        return meta
    even = [1100 + i for i in range(256)]
    assert planned(even).num_splits == 1
    assert planned([500] * 255 + [8000]).num_splits == triton_backend.RAGGED_DECODE_SPLITS  # skewed
    assert planned([1100] * 32).num_splits == triton_backend.RAGGED_DECODE_SPLITS  # too few programs
    # a graph's placeholder lengths under the max_seq_len it is planned for: the ragged plan
    assert planned([1] * 256, max_seq_len=40960).num_splits == triton_backend.RAGGED_DECODE_SPLITS
    mixed = planned(even + [3000], query_lens=[1] * 256 + [512])  # the decodes of a mixed step
    assert mixed.parts[0].num_splits == 1
    monkeypatch.setattr(triton_backend, "EVEN_DECODE_GRAPHS", 0)
    assert planned(even).num_splits == triton_backend.RAGGED_DECODE_SPLITS
