"""A worker's request mirrors, fed only step messages, hold what the scheduler's requests hold."""
import msgspec
import numpy as np

from sageinfer import LLM, SamplingParams
from sageinfer.executor import step_message as sm


def test_mirrors_follow_the_scheduler_through_preemption_and_async_steps(model_dirs):
    llm = LLM(model_dirs["llama"], dtype="float32", num_gpu_blocks_override=16, block_size=16, max_model_len=200,
              max_num_batched_tokens=24, admission_lookahead_tokens=0, show_progress=False)
    engine = llm.engine
    builder, mirrors = sm.StepMessageBuilder(), sm.WorkerRequests(engine.eos_token_ids, engine.runner.device)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(sm.WorkerCommand)
    execute = engine.runner.execute
    checked = 0

    def mirrored_execute(scheduled, prev_tokens=None, **kw):
        nonlocal checked
        message = decoder.decode(encoder.encode(builder.build(scheduled, prev_tokens is not None)))
        for (request, n), (mirror, m) in zip(scheduled, mirrors.apply(message)):
            assert (mirror.request_id, m) == (request.request_id, n)
            assert mirror.all_token_ids == request.all_token_ids and mirror.block_ids == request.block_ids
            assert (mirror.num_computed_tokens, mirror.num_pending_tokens, mirror.last_sampled_row) == (
                request.num_computed_tokens, request.num_pending_tokens, request.last_sampled_row)
            assert mirror.output_token_ids == request.output_token_ids
            checked += 1
        assert set(mirrors.requests) >= {r.request_id for r, _ in scheduled}
        return execute(scheduled, prev_tokens, **kw)

    engine.runner.execute = mirrored_execute
    rng = np.random.default_rng(3)
    prompts = [{"prompt_token_ids": rng.integers(3, 500, size=n).tolist()} for n in (5, 80, 33, 120, 2, 64)]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True, n=1 + i % 2) for i in range(6)]
    llm.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0 and checked > 100
    mirrors.apply(decoder.decode(encoder.encode(builder.build([], False))))  # drops every finished request
    assert not builder._sent and not mirrors.requests


def test_mirrors_get_what_a_deferred_draw_reads(model_dirs):
    """A step whose draw waits for the step in flight (grammars, bad words): the token masks message brings each
    mirror the tokens since resolved and the grammar's new bitmask, so a worker bans and allows what rank 0 does."""
    from sageinfer.executor.sampling_inputs import _bad_word_endings
    from sageinfer.sampling_params import StructuredOutputsParams
    llm = LLM(model_dirs["llama"], dtype="float32", num_gpu_blocks_override=64, max_model_len=200, show_progress=False)
    engine = llm.engine
    builder, mirrors = sm.StepMessageBuilder(), sm.WorkerRequests(engine.eos_token_ids, engine.runner.device)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(sm.WorkerCommand)
    execute, sample_pending = engine.runner.execute, engine.runner.sample_pending
    checked = {"grammar": 0, "bad words": 0}

    def mirrored_execute(scheduled, prev_tokens=None, defer_token_masks=False, **kw):
        message = builder.build(scheduled, prev_tokens is not None, None, defer_token_masks)
        mirrors.apply(decoder.decode(encoder.encode(message)))
        return execute(scheduled, prev_tokens, defer_token_masks=defer_token_masks, **kw)

    def mirrored_sample_pending(result):
        mirrors.apply_masks(decoder.decode(encoder.encode(builder.build_token_masks(result.sampled_requests))))
        for request in result.sampled_requests:
            if request.is_finished or not request.sampling_params.needs_output_tokens:
                continue
            mirror = mirrors.requests[request.request_id]
            assert mirror.all_token_ids == request.all_token_ids[:request.num_known_tokens]
            assert _bad_word_endings(mirror) == _bad_word_endings(request)
            if request.grammar_bitmask is not None:
                assert np.array_equal(mirror.grammar_bitmask, request.grammar_bitmask)
                checked["grammar"] += 1
            else:
                checked["bad words"] += 1
        return sample_pending(result)

    engine.runner.execute, engine.runner.sample_pending = mirrored_execute, mirrored_sample_pending
    params = [SamplingParams(temperature=1.0, seed=1, max_tokens=30, structured_outputs=StructuredOutputsParams(
                  regex=r"([a-m][n-z]){3,12}")),
              SamplingParams(temperature=0.9, seed=2, max_tokens=20, ignore_eos=True, bad_words=["an", "e t"]),
              SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)]
    llm.generate(["Hello, my name is", "The answer:", "Pick:"], params, use_tqdm=False)
    assert checked["grammar"] > 5 and checked["bad words"] > 10
