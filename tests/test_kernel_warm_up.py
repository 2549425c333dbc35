"""The start-up's attention-kernel warm-up (attention/kernel_warm_up.py): it holds every choice the
Triton backend's plan can make for a decode batch, and a step's decode launches compile nothing that
the warm-up did not (the same constexprs and the same specialisation of every other argument)."""
import contextlib
import threading
import types

import numpy as np
import pytest
import torch

from sageinfer import LLM, SamplingParams
from sageinfer.attention import triton_backend
from sageinfer.attention.backend import AttentionMetadata
from sageinfer.attention.kernel_warm_up import decode_plans, graph_plans, prefill_plans, warm_up_kernels
from sageinfer.attention.triton_backend import TritonBackend
from sageinfer.executor.graph_runner import DecodeGraphs, graph_batch_sizes
from sageinfer.layers.attention import Attention
from sageinfer.ops import cascade_attention
from sageinfer.ops import paged_attention as pa
from sageinfer.ops import prefill_attention as tile_prefill
from kernels_util import launch_key


@pytest.mark.parametrize("num_sms, ragged", [(132, 8), (132, 0), (8, 8)])
def test_decode_plans_hold_every_choice_of_the_plan(monkeypatch, num_sms, ragged):
    monkeypatch.setattr(triton_backend, "RAGGED_DECODE_SPLITS", ragged)
    backend = TritonBackend(num_sms=num_sms)
    max_num_seqs, max_model_len, kv_heads = 300, 9000, 8
    plans = decode_plans(backend, max_num_seqs, max_model_len, kv_heads, eager_decode_from=200)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        num_seqs = int(rng.integers(1, max_num_seqs + 1))
        longest = int(rng.integers(1, max_model_len + 1))
        meta = AttentionMetadata(0, None, None, None, None, max_query_len=1, max_seq_len=longest,
                                 query_start_loc_cpu=[], seq_lens_cpu=[1] * num_seqs)
        backend.plan(meta, kv_heads)
        choice = (meta.num_splits, meta.min_split_keys)
        if num_seqs < max_num_seqs:  # a mixed step's decodes
            assert (*choice, False, False, meta.wide_decode) in plans, (num_seqs, longest)
        if num_seqs >= 200:  # a decode step past the graphs
            assert (*choice, True, False, meta.wide_decode) in plans, (num_seqs, longest)
        assert meta.wide_decode == (meta.num_splits == 1 and num_seqs * kv_heads >= 8 * num_sms)
    assert {whole for _, _, whole, _, _ in plans} == {False, True} and any(s > 1 for s, *_ in plans)
    assert {wide for *_, wide in plans} == {False, True}


def _record(monkeypatch, name: str, seen: set, module=pa, decodes_only: bool = True) -> None:
    kernel = getattr(module, name)

    class Recorder:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                # decode launches (prefill chunks take wider query tiles), or every launch
                if not decodes_only or kwargs.get("BLOCK_Q", 1) == 1:
                    seen.add(launch_key(kernel, args, kwargs))
                return launch(*args, **kwargs)
            return run
    monkeypatch.setattr(module, name, Recorder())


def test_a_steps_decode_launches_compile_nothing_the_warm_up_did_not(model_dirs, monkeypatch):
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=256, max_num_seqs=8, max_num_batched_tokens=24, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    runner.backend.num_sms = 12  # small decode batches split by occupancy, larger ones by raggedness
    warmed, stepped = set(), set()
    for name in ("_paged_attention_kernel", "_merge_splits_kernel"):
        _record(monkeypatch, name, warmed)
    layer = next(m for m in runner.model.modules() if isinstance(m, Attention))
    one_block = runner._layer_cache(1)  # as start-up warms: the cache's layout, before the cache exists
    before = one_block.k.clone()
    plans = decode_plans(runner.backend, 8, 256, runner.num_kv_heads, eager_decode_from=1)
    warm_up_kernels(runner.backend, layer, one_block, plans, runner.device, runner.dtype)
    assert one_block.k.equal(before), "the warm-up wrote into the cache"
    # Plans that split share one attention compile (the split count is an argument) and differ in their merges.
    attention_compiles = {key[:2] for key in warmed if key[0] == "_paged_attention_kernel"}
    assert len(attention_compiles) == len({(splits > 1, *rest) for splits, _, *rest in plans})
    assert ({dict(key[1])["NUM_SPLITS"] for key in warmed if key[0] == "_merge_splits_kernel"}
            == {str(splits) for splits, *_ in plans if splits > 1})
    monkeypatch.undo()
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    for name in ("_paged_attention_kernel", "_merge_splits_kernel"):
        _record(monkeypatch, name, stepped)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (70, 3, 9, 40, 5, 120)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert any(dict(key[1]).get("SPLIT") == "True" for key in stepped), "no step split its decodes"
    missing = stepped - warmed
    assert not missing, f"{len(missing)} decode launches of the steps were not warmed up: {sorted(missing)[:2]}"


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_wide_decode_batches_over_an_8_bit_cache_take_warmed_narrow_tiles(model_dirs, monkeypatch, kv_cache_dtype):
    """A decode batch whose programs fill the GPU many times over (here: every SM once, on 4 SMs) reads an
    FP8 or INT8 cache in the narrow tiles of ops/paged_attention.WIDE_DECODE_CONFIGS, in decode steps and in mixed
    steps' decodes alike; the warm-up compiled those launches too, and the tokens are those of the
    batch's usual tiles."""
    def wide_from_one_program_an_sm():
        monkeypatch.setattr(triton_backend, "WIDE_DECODE_PROGRAMS_PER_SM", 1)
    wide_from_one_program_an_sm()
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=64,
              max_model_len=256, max_num_seqs=8, max_num_batched_tokens=24, enforce_eager=True,
              kv_cache_dtype=kv_cache_dtype, show_progress=False)
    runner = llm.engine.runner
    runner.backend.num_sms = 4
    warmed, stepped = set(), set()
    _record(monkeypatch, "_paged_attention_kernel", warmed)
    layer = next(m for m in runner.model.modules() if isinstance(m, Attention))
    plans = decode_plans(runner.backend, 8, 256, runner.num_kv_heads, eager_decode_from=1)
    warm_up_kernels(runner.backend, layer, runner._layer_cache(1), plans, runner.device, runner.dtype)
    monkeypatch.undo()
    wide_from_one_program_an_sm()
    _record(monkeypatch, "_paged_attention_kernel", stepped)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (30, 3, 9, 40, 5, 20, 7, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    wide = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]
    narrow_tiles = {"num_warps": str(pa.WIDE_DECODE_CONFIGS[runner.kv_caches[0].mode]["num_warps"])}
    assert any(narrow_tiles.items() <= dict(key[1]).items() for key in stepped), "no step took the narrow tiles"
    missing = stepped - warmed
    assert not missing, f"{len(missing)} decode launches of the steps were not warmed up: {sorted(missing)[:2]}"
    monkeypatch.setattr(triton_backend, "WIDE_DECODE_PROGRAMS_PER_SM", 10 ** 6)  # never wide
    usual = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                           use_tqdm=False)]
    assert wide == usual


def test_a_prompts_prefill_launches_compile_nothing_the_warm_up_did_not(model_dirs, monkeypatch):
    """Prompts below and past LONG_CONTEXT (lowered here to 128 keys, so that a long prompt takes the
    long tiles), whole or in chunks after cached context, launch only prefill-attention variants that
    the warm-up's prefill plans compiled."""
    def long_from_128():
        for module in (pa, triton_backend, tile_prefill):
            monkeypatch.setattr(module, "LONG_CONTEXT", 128)
    long_from_128()
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", block_size=128,
              num_gpu_blocks_override=8, max_model_len=512, max_num_batched_tokens=140, enforce_eager=True,
              show_progress=False)
    runner = llm.engine.runner
    layer = next(m for m in runner.model.modules() if isinstance(m, Attention))
    plans = prefill_plans(512, runner.block_size)
    assert {plan.max_seq_len for plan in plans} == {128}  # the page is as long as a long prompt here
    plans.add(next(iter(plans))._replace(max_seq_len=100))  # and a short one
    warmed, stepped = set(), set()
    _record(monkeypatch, "_prefill_attention_kernel", warmed, tile_prefill, decodes_only=False)
    one_block = runner._layer_cache(1)
    before = one_block.k.clone()
    warm_up_kernels(runner.backend, layer, one_block, plans, runner.device, runner.dtype)
    assert one_block.k.equal(before), "the warm-up wrote into the cache"
    assert {dict(key[1])["num_warps"] for key in warmed} == {"4", "8"}  # short and long tiles
    monkeypatch.undo()
    long_from_128()
    _record(monkeypatch, "_prefill_attention_kernel", stepped, tile_prefill, decodes_only=False)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 500, size=n).tolist() for n in (70, 200)]  # steps: 70 + 70 (short), 130 after 70
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=1),
                 use_tqdm=False)
    assert {dict(key[1])["num_warps"] for key in stepped} == {"4", "8"}
    missing = stepped - warmed
    assert not missing, f"{len(missing)} prefill launches of the steps were not warmed up: {sorted(missing)[:2]}"


def test_prefill_plans_come_first_and_long_ones_only_where_prompts_reach_them():
    assert {p.max_seq_len for p in prefill_plans(2048, 64)} == {64}
    assert {p.max_seq_len for p in prefill_plans(32768, 64)} == {64, pa.LONG_CONTEXT}
    # a short max_model_len whose steps may still hold enough new tokens for the platform's kernel
    from sageinfer.attention.triton_backend import PLATFORM_PREFILL_MIN_TOKENS
    assert PLATFORM_PREFILL_MIN_TOKENS > 0
    assert {p.max_seq_len for p in prefill_plans(2048, 64, PLATFORM_PREFILL_MIN_TOKENS)} == {64, pa.LONG_CONTEXT}
    assert {p.max_seq_len for p in prefill_plans(2048, 64, PLATFORM_PREFILL_MIN_TOKENS - 1)} == {64}
    launched = []

    class Backend:
        def forward(self, layer, positions, q, k, v, cache, meta):
            launched.append("decode")

        def _attend(self, layer, q, out, cache, meta, rope):
            launched.append("prefill" if meta.max_query_len > 1 else "decode")
    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    plans = {(1, 0, True, False, False), (2, 0, False, False, False)} | prefill_plans(32768, 16)
    warm_up_kernels(Backend(), layer, types.SimpleNamespace(k=torch.zeros(1, 16, 2, 16)), plans,
                           torch.device("cpu"), torch.float32, again=False)
    assert launched == ["prefill", "prefill", "decode", "decode"]


def test_a_threaded_warm_up_launches_each_plan_from_the_pool_then_again_from_its_own_thread():
    """Every plan compiles in the pool (in the launch mode of its plan, which is per thread), then runs
    once more from the caller's thread: a kernel two threads launched first together keeps one compile
    in memory, the other's is found again there."""
    from sageinfer.ops import launch
    launched, entered, lock = [], [], threading.Lock()

    class Backend:
        def forward(self, layer, positions, q, k, v, cache, meta):
            self._note(meta, True)

        def _attend(self, layer, q, out, cache, meta, rope):
            self._note(meta, False)

        def _note(self, meta, whole):
            dependent = launch.dependent_launch_kwargs()["USE_PDL"]
            with lock:
                launched.append(((meta.num_splits, meta.min_split_keys, whole, dependent, meta.wide_decode),
                                 threading.get_ident()))

    def enter():
        with lock:
            entered.append(threading.get_ident())
    plans = {(s, keys, whole, dependent, s == 1 and whole) for s in (1, 2, 4, 8) for keys in (0, 1024)
             for whole in (False, True) for dependent in (False, True) if not (s == 1 and keys)}
    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    cache = types.SimpleNamespace(k=torch.zeros(4, 16, 2, 16), mode=1)  # an FP8 cache: wide plans of their own
    warm_up_kernels(Backend(), layer, cache, plans, torch.device("cpu"), torch.float32, threads=3,
                           enter_thread=enter)
    main = threading.get_ident()
    pooled = [plan for plan, ident in launched if ident != main]
    assert sorted(pooled) == sorted(plans) and {ident for _, ident in launched if ident != main} <= set(entered)
    assert sorted(plan for plan, ident in launched if ident == main) == sorted(plans)
    assert launch.dependent_launch_kwargs() == {"USE_PDL": False}  # the caller's mode is as it was


def test_the_launch_mode_is_per_thread():
    from sageinfer.ops import launch
    seen = []
    with launch.dependent_launch(True):
        other = threading.Thread(target=lambda: seen.append(launch.dependent_launch_kwargs()))
        other.start(), other.join()
        assert launch.dependent_launch_kwargs() == {"USE_PDL": True, "launch_pdl": True}
    assert seen == [{"USE_PDL": False}] and launch.dependent_launch_kwargs() == {"USE_PDL": False}


def test_the_graphs_capture_compiles_no_attention_the_warm_up_did_not(model_dirs, monkeypatch):
    """The decode graphs' attention launches (their capture run eagerly on a stand-in platform whose
    graphs record nothing) are among the warm-up's, ragged splits and splits by occupancy both."""
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    llm = LLM(model_dirs["qwen3"], dtype="float32", attention_backend="triton", num_gpu_blocks_override=80,
              max_model_len=1024, max_num_seqs=8, enforce_eager=True, show_progress=False)
    runner = llm.engine.runner
    runner.backend.num_sms = 12
    layer = next(m for m in runner.model.modules() if isinstance(m, Attention))
    sizes = graph_batch_sizes(8)
    plans = graph_plans(runner.backend, sizes, 1024, runner.num_kv_heads, dependent_max=0)
    warmed, captured = set(), set()
    for name in ("_paged_attention_kernel", "_merge_splits_kernel"):
        _record(monkeypatch, name, warmed)
    _record(monkeypatch, "_prefix_attention_kernel", warmed, module=cascade_attention)
    warm_up_kernels(runner.backend, layer, runner._layer_cache(1), plans, runner.device, runner.dtype)
    monkeypatch.undo()
    monkeypatch.setattr(triton_backend, "RAGGED_MIN_KEYS", 32)
    for name in ("_paged_attention_kernel", "_merge_splits_kernel"):
        _record(monkeypatch, name, captured)
    _record(monkeypatch, "_prefix_attention_kernel", captured, module=cascade_attention)
    platform = types.SimpleNamespace(graph_pool_handle=lambda: None, supports_dependent_launch=lambda: False,
                                     graph_class=lambda: (lambda: None), synchronize=lambda: None,
                                     graph_context=lambda graph, pool=None: contextlib.nullcontext())
    DecodeGraphs(runner.model, runner.backend, platform, runner.device, 8, 1024, runner.block_size,
                 runner.num_kv_heads, runner.kv_caches)
    assert {dict(key[1])["NUM_SPLITS"] for key in captured if key[0] == "_merge_splits_kernel"} >= {"4", "8"}
    assert any(dict(key[1]).get("CASCADE") == "True" for key in captured)  # a graph with the prefix input
    assert any(key[0] == "_prefix_attention_kernel" for key in captured)
    missing = captured - warmed
    assert not missing, f"{len(missing)} attention launches of the capture were not warmed up: {sorted(missing)[:2]}"


def test_a_failing_warm_up_is_logged_and_start_up_goes_on(caplog):
    from sageinfer.executor.model_runner import ModelRunner

    def fail(*args, **kwargs):
        raise RuntimeError("no launch today")
    backend = TritonBackend(num_sms=4)
    backend.forward = backend._attend = fail
    layer = Attention(4, 2, 16, rotary_emb=None)
    runner = types.SimpleNamespace(
        backend=backend, device=torch.device("meta"), num_kv_heads=2, dtype=torch.float32, block_size=16,
        _captures_graphs=lambda: False,
        config=types.SimpleNamespace(max_num_seqs=4, max_model_len=64, max_graph_batch_size=512,
                                      max_num_batched_tokens=64),
        platform=types.SimpleNamespace(supports_triton=True, supports_dependent_launch=lambda: False,
                                       synchronize=lambda: None),
        model=torch.nn.ModuleList([layer]), _layer_cache=lambda blocks: types.SimpleNamespace(k=torch.zeros(blocks, 16, 2, 16)),
        _finish_kernel_warm_up=None, kernel_warm_up_wait_seconds=0.0)
    with caplog.at_level("WARNING"):
        ModelRunner.start_kernel_warm_up(runner)
        seconds = ModelRunner.finish_kernel_warm_up(runner)
    assert seconds >= 0 and "kernel warm-up failed" in caplog.text and "no launch today" in caplog.text
    assert ModelRunner.finish_kernel_warm_up(runner) == 0.0  # finished once


def test_the_attention_warm_up_starts_before_the_weights_load_and_a_failed_load_cancels_it(llama_dir, monkeypatch):
    """The attention kernels need the layers' shapes only: their compiles start once the model is built, beside
    the weights' load; the quantized layers' start after it (their kernels take the converted weights)."""
    from sageinfer.executor.model_runner import ModelRunner
    from sageinfer.models.llama import LlamaForCausalLM
    events = []

    def start(self, attention=True, linear=True):  # as on a GPU: a background warm-up, recording its finish
        assert isinstance(self.model, LlamaForCausalLM)  # the layers exist
        events.append(("start", attention, linear))
        self._finish_kernel_warm_up = lambda cancel=False: events.append(("finish", cancel))
    monkeypatch.setattr(ModelRunner, "start_kernel_warm_up", start)
    load = LlamaForCausalLM.load_weights
    monkeypatch.setattr(LlamaForCausalLM, "load_weights",
                        lambda model, weights: events.append(("load",)) or load(model, weights))
    LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    assert events == [("start", True, False), ("load",), ("start", False, True), ("finish", False)]

    def fail(model, weights):
        events.append(("load",))
        raise ValueError("a broken checkpoint")
    events.clear()
    monkeypatch.setattr(LlamaForCausalLM, "load_weights", fail)
    with pytest.raises(ValueError, match="a broken checkpoint"):
        LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    assert events == [("start", True, False), ("load",), ("finish", True)]  # cancelled, not left compiling


def test_the_model_loads_phases_are_timed_where_they_happen(llama_dir, monkeypatch):
    """Start-up's timings of the model load (ModelRunner.load_phases): a slow weights' load shows in its own
    phase, not in the layers' building, and the phases together fit in the load's time."""
    import time
    from sageinfer.models.llama import LlamaForCausalLM
    load = LlamaForCausalLM.load_weights
    monkeypatch.setattr(LlamaForCausalLM, "load_weights",
                        lambda model, weights: time.sleep(0.3) or load(model, weights))
    engine = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False).engine
    phases = engine.runner.load_phases
    assert list(phases) == ["backend_s", "built_s", "weights_s", "converted_s"]
    assert phases["weights_s"] >= 0.3 > phases["built_s"] and phases["converted_s"] < 0.3
    assert sum(phases.values()) <= engine.model_load_seconds


def test_a_cache_without_wide_tiles_launches_each_plan_once():
    """Over a cache whose wide decode batches keep the usual tiles (bf16), a wide plan and its usual twin are
    one kernel: the warm-up launches it once (two threads would compile it twice)."""
    launched = []

    class Backend:
        def _attend(self, layer, q, out, cache, meta, rope):
            launched.append((meta.num_splits, meta.wide_decode))
    plans = {(1, 0, False, False, wide) for wide in (False, True)} | {(2, 0, False, False, False)}
    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    warm_up_kernels(Backend(), layer, types.SimpleNamespace(k=torch.zeros(1, 16, 2, 16), mode=0), plans,
                    torch.device("cpu"), torch.float32, again=False)
    assert sorted(launched) == [(1, False), (2, False)]


def test_the_background_warm_up_lets_start_up_go_on_until_it_is_finished():
    """start_in_background returns while the pool's launches are still running; finish() waits for
    them, then launches each plan once more from the caller's thread."""
    from sageinfer.attention.kernel_warm_up import start_in_background
    release, launched, lock = threading.Event(), [], threading.Lock()

    class Backend:
        def _attend(self, layer, q, out, cache, meta, rope):
            if threading.get_ident() != main:
                assert release.wait(10)
            with lock:
                launched.append((meta.num_splits, threading.get_ident()))

    main = threading.get_ident()
    plans = {(s, 0, False, False, False) for s in (1, 2, 4)}
    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    cache = types.SimpleNamespace(k=torch.zeros(1, 16, 2, 16))
    finish = start_in_background(Backend(), layer, cache, plans, torch.device("cpu"), torch.float32, threads=2)
    assert launched == []  # start-up goes on while the pool waits
    release.set()
    finish()
    assert sorted(s for s, ident in launched if ident != main) == [1, 2, 4]
    assert sorted(s for s, ident in launched if ident == main) == [1, 2, 4]


def test_a_background_warm_ups_error_reaches_finish():
    from sageinfer.attention.kernel_warm_up import start_in_background

    class Backend:
        def _attend(self, *args):
            raise RuntimeError("compile failed")
    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    finish = start_in_background(Backend(), layer, types.SimpleNamespace(k=torch.zeros(1, 16, 2, 16)),
                                 {(1, 0, False, False, False), (2, 0, False, False, False)}, torch.device("cpu"),
                                 torch.float32, threads=2)
    with pytest.raises(RuntimeError, match="compile failed"):
        finish()


def test_a_cancelled_background_warm_up_skips_the_plans_not_yet_begun():
    """A start-up that fails cancels the warm-up: the launches under way end, the rest never start, and
    nothing is raised or launched again from the caller's thread."""
    from sageinfer.attention.kernel_warm_up import start_in_background
    release, launched, lock = threading.Event(), [], threading.Lock()
    entered = threading.Semaphore(0)

    class Backend:
        def _attend(self, layer, q, out, cache, meta, rope):
            entered.release()
            assert release.wait(10)
            with lock:
                launched.append(meta.num_splits)

    layer = types.SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16)
    plans = {(s, 0, False, False, False) for s in (1, 2, 4, 8, 16, 32)}
    finish = start_in_background(Backend(), layer, types.SimpleNamespace(k=torch.zeros(1, 16, 2, 16)), plans,
                                 torch.device("cpu"), torch.float32, threads=2)
    assert entered.acquire(timeout=10) and entered.acquire(timeout=10)  # two launches under way
    threading.Timer(0.2, release.set).start()
    finish(cancel=True)
    assert len(launched) == 2
