"""Launching step N+1 before reading step N's tokens must not change any output."""
import json
import re

import numpy as np

from greedy_words import two_token_words
from sageinfer import LLM, SamplingParams


def _workload(tokenizer_vocab=500):
    rng = np.random.default_rng(21)
    prompts = [{"prompt_token_ids": rng.integers(3, tokenizer_vocab, size=n).tolist()}
               for n in (5, 80, 33, 120, 2, 64, 17, 150)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=1.0, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=40, min_tokens=3, stop_token_ids=[7, 11, 13, 17, 19, 23]),
        SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True),  # runs into max_model_len
        SamplingParams(temperature=0.7, top_k=5, seed=9, max_tokens=18, ignore_eos=True, presence_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=15, stop=["a", "e"], ignore_eos=True),
    ]
    return prompts, params


def _run(model_dir, async_scheduling, **kwargs):
    llm = LLM(model_dir, dtype="float32", async_scheduling=async_scheduling, show_progress=False, **kwargs)
    prompts, params = _workload()
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.kv_manager.pool.check_accounting()
    assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.pool.usable_blocks
    return llm, [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                   None if c.logprobs is None else [sorted(e) for e in c.logprobs]) for c in o.outputs] for o in outs]


def test_async_and_sync_steps_give_identical_outputs(llama_dir):
    _, sync = _run(llama_dir, False, num_gpu_blocks_override=256, max_model_len=200)
    _, asyn = _run(llama_dir, True, num_gpu_blocks_override=256, max_model_len=200)
    assert asyn == sync
    assert sync[5][0][2] == "length" and len(sync[5][0][0]) == 200 - 64


def test_async_with_preemption_and_tiny_chunks_gives_identical_outputs(llama_dir):
    kwargs = dict(num_gpu_blocks_override=16, block_size=16, max_model_len=200, max_num_batched_tokens=24,
                  admission_lookahead_tokens=0)  # admit greedily: preemptions must happen
    _, sync = _run(llama_dir, False, **kwargs)
    llm, asyn = _run(llama_dir, True, **kwargs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert asyn == sync


def test_a_request_at_its_token_limit_gets_no_extra_step(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    launches = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda scheduled, prev=None, **kw: launches.append(len(scheduled)) or execute(
        scheduled, prev, **kw)
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1 and launches == [1]
    launches.clear()
    llm.generate({"prompt_token_ids": [3, 4, 6]}, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert launches == [1] * 5


def test_grammars_and_bad_words_keep_steps_async_and_outputs_identical(llama_dir):
    """Requests with a grammar or bad words read their tokens on the host: the next step's forward is launched
    before the step in flight is read, and only its draw waits for their masks. The outputs, theirs and their
    batch neighbours', are those of synchronous steps."""
    from sageinfer.sampling_params import StructuredOutputsParams
    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}}}
    prompts, params = _workload()
    words = two_token_words(llama_dir, prompts[0], 30)  # that greedy decoding would write: the bans bite
    assert words
    params = params + [
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema)),
        SamplingParams(temperature=0.8, seed=4, max_tokens=20, structured_outputs=StructuredOutputsParams(
            regex=r"[0-9]{2}-[a-c]{2,5}")),
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, bad_words=words[:2] + ["e"]),
        SamplingParams(temperature=0.9, seed=6, max_tokens=30, ignore_eos=True, bad_words=["the", "a b"],
                       min_tokens=4)]
    prompts = prompts + [prompts[1], prompts[3], prompts[0], prompts[2]]
    runs, deferred = [], []
    for async_scheduling in (False, True):
        llm = LLM(llama_dir, dtype="float32", async_scheduling=async_scheduling, show_progress=False,
                  num_gpu_blocks_override=256, max_model_len=200)
        sample_pending = llm.engine.runner.sample_pending
        llm.engine.runner.sample_pending = lambda result: deferred.append(result.pending is not None) or \
            sample_pending(result)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs])
        assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.pool.usable_blocks
    sync, asyn = runs
    assert asyn == sync
    assert deferred and all(deferred)  # async steps drew after the step in flight was read; sync steps never wait
    assert sync[8][0][2] == "stop" and set(json.loads(sync[8][0][1])) == {"ok", "n"}
    assert re.fullmatch(r"[0-9]{2}-[a-c]{2,5}", sync[9][0][1])
    assert not any(word in sync[10][0][1] for word in words[:2])


def test_deferred_draws_through_preemption_and_tiny_chunks(llama_dir):
    """Grammar and bad-words requests in a cache too small for them all: preempted and recomputed in chunks of
    24 tokens, their deferred draws still give the synchronous run's tokens."""
    from sageinfer.sampling_params import StructuredOutputsParams
    schema = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}}}
    kwargs = dict(num_gpu_blocks_override=16, block_size=16, max_model_len=200, max_num_batched_tokens=24,
                  admission_lookahead_tokens=0)
    prompts = ["The answer:", "Hello, my name is", "Pick one of these", "x " * 30, "y " * 20, "z"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=StructuredOutputsParams(
        json=schema)) for s in range(3)]
    params += [SamplingParams(temperature=0.9, seed=9, max_tokens=40, ignore_eos=True, bad_words=["an", "e t"])] * 3
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(llama_dir, dtype="float32", async_scheduling=async_scheduling, show_progress=False, **kwargs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.pool.usable_blocks
    assert runs[1] == runs[0]
