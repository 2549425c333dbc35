"""The offline API end to end: stops, min_tokens, n > 1, logprobs, seeds, text, errors."""
import pytest

from sageinfer import LLM, SamplingParams
from oracle import hf_logits


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", num_gpu_blocks_override=512, show_progress=False)


def _greedy(llm, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 20)
    return llm.generate(prompt, SamplingParams(temperature=0.0, **kwargs), use_tqdm=False)[0].outputs[0]


def test_outputs_come_back_in_input_order_with_vllm_fields(llm):
    prompts = ["Hello, my name is", {"prompt_token_ids": [5, 6, 7]}, "The capital of France is"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8, seed=1), use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello, my name is", None, "The capital of France is"]
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[0].prompt_token_ids == llm.get_tokenizer().encode("Hello, my name is")
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.index == 0 and c.finish_reason in ("stop", "length") and 1 <= len(c.token_ids) <= 8


def test_text_is_the_decoding_of_the_tokens(llm):
    out = _greedy(llm, "Hello, my name is", max_tokens=24)
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)


def test_stop_string_ends_generation_and_is_not_returned(llm):
    full = _greedy(llm, "Once upon a time", max_tokens=30, ignore_eos=True)
    stop = full.text[5:8]
    assert stop.strip(), "fixture text too short"
    out = _greedy(llm, "Once upon a time", max_tokens=30, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.find(stop)]
    kept = _greedy(llm, "Once upon a time", max_tokens=30, ignore_eos=True, stop=[stop],
                   include_stop_str_in_output=True)
    assert kept.text.endswith(stop)


def test_stop_token_id_ends_generation(llm):
    full = _greedy(llm, {"prompt_token_ids": [10, 20, 30]}, max_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    out = _greedy(llm, {"prompt_token_ids": [10, 20, 30]}, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id])
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == full.token_ids[:first + 1]


def test_min_tokens_holds_back_stop_tokens(llm):
    full = _greedy(llm, {"prompt_token_ids": [10, 20, 30]}, max_tokens=20, ignore_eos=True)
    stop_id = full.token_ids[0]
    out = _greedy(llm, {"prompt_token_ids": [10, 20, 30]}, max_tokens=20, ignore_eos=True,
                  stop_token_ids=[stop_id], min_tokens=5)
    assert len(out.token_ids) >= 5 and stop_id not in out.token_ids[:5]


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    prompt = {"prompt_token_ids": [11, 12, 13]}
    first_token = _greedy(llm, prompt, max_tokens=1).token_ids[0]
    # Make eos the greedy choice by treating it as the first token: use stop_token_ids semantics via eos.
    llm.engine.eos_token_ids.add(first_token)
    try:
        stopped = _greedy(llm, prompt, max_tokens=10)
        ignored = _greedy(llm, prompt, max_tokens=10, ignore_eos=True)
    finally:
        llm.engine.eos_token_ids.discard(first_token)
        llm.engine.eos_token_ids.add(eos)
    assert stopped.token_ids == [first_token] and stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert len(ignored.token_ids) == 10 and ignored.finish_reason == "length"


def test_n_samples_share_the_prompt_and_differ(llm):
    prompt = {"prompt_token_ids": list(range(3, 70))}
    before = llm.engine.num_prompt_tokens_computed
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=3, ignore_eos=True),
                       use_tqdm=False)[0]
    computed = llm.engine.num_prompt_tokens_computed - before
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # 67 prompt tokens: the first sample computes them all, the others only past the 4 shared full blocks.
    assert computed == 67 + 3 * (67 - 64)
    llm.engine.kv_manager.pool.check_accounting()


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=16, seed=1234, ignore_eos=True)
    prompt = {"prompt_token_ids": [40, 41, 42, 43]}
    alone = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 90, 17)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=16)
    batch = llm.generate(others[:2] + [prompt] + others[2:], [unseeded, unseeded, params, unseeded],
                         use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_logprobs_match_transformers(llm, llama_dir):
    prompt = [7, 8, 9, 10]
    out = _greedy(llm, {"prompt_token_ids": prompt}, max_tokens=5, logprobs=3, ignore_eos=True)
    assert len(out.logprobs) == 5
    ref = hf_logits(llama_dir, prompt + out.token_ids[:-1]).log_softmax(-1)
    # float32 on the CPU agrees to rounding; GPU matmuls reduce in another order (and may use TF32).
    tolerance = 1e-4 if llm.engine.platform.device_type == "cpu" else 3e-3
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert token in entry and entry[token].rank == 1
        assert abs(entry[token].logprob - row[token].item()) < tolerance
        top = row.topk(3)
        assert set(top.indices.tolist()) <= set(entry)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_penalties_change_the_output(llm):
    prompt = {"prompt_token_ids": [5, 5, 5, 5]}
    plain = _greedy(llm, prompt, max_tokens=30, ignore_eos=True).token_ids
    penalised = _greedy(llm, prompt, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                        repetition_penalty=1.8).token_ids
    assert plain != penalised
    assert max(penalised.count(t) for t in set(penalised)) <= max(plain.count(t) for t in set(plain))


def test_chinese_text_comes_out_whole(llm):
    tok = llm.get_tokenizer()
    text = "你好，世界！今天天气很好。北京是中国的首都。"
    ids = tok.encode(text)
    from sageinfer.engine.detokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    seen = []
    for t in ids:
        detok.add_token(t, check_stop=False)
        seen.append(detok.text)
    assert detok.text == text
    assert all("\ufffd" not in s for s in seen)


def test_prompt_longer_than_max_model_len_is_rejected(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=64, max_model_len=64, show_progress=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": list(range(3, 100))}],
                     SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    ok = llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 4


def test_generation_stops_at_max_model_len(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=64, max_model_len=40, show_progress=False)
    out = llm.generate({"prompt_token_ids": list(range(3, 33))}, SamplingParams(max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_skip_tokenizer_init_takes_token_ids_and_returns_no_text(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=65, skip_tokenizer_init=True, show_progress=False)
    out = llm.generate({"prompt_token_ids": [3, 4]}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].text == "" and len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text prompt", use_tqdm=False)


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_tokens=-1), "max_tokens"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"), (dict(top_k=-5), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(n=0), "n"), (dict(presence_penalty=3.0), "presence_penalty"), (dict(repetition_penalty=0.0),
                                                                        "repetition_penalty"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"), (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params_raise_clear_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_bad_prompt_ids_are_rejected(llm):
    with pytest.raises(ValueError, match="outside"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty|1 to"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)


def test_text_that_is_not_unicode_is_rejected_with_its_field(llm):
    """A lone UTF-16 surrogate (what JSON's "\\ud800" decodes to): a ValueError naming the field, not the
    tokenizer's TypeError."""
    with pytest.raises(ValueError, match="prompt holds a lone surrogate \\(U\\+D800\\) at character 2"):
        llm.generate("ab\ud800", use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words holds a lone surrogate"):
        llm.generate("ab", SamplingParams(bad_words=["\udfff"]), use_tqdm=False)
    with pytest.raises(ValueError, match="messages holds a lone surrogate"):
        llm.chat([{"role": "user", "content": "x\udc00"}], use_tqdm=False)


def test_generate_after_an_interrupted_call_returns_only_its_own_outputs(llama_dir):
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    step = llm.engine.step
    calls = {"n": 0}

    def interrupted_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return step()
    llm.engine.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    llm.engine.step = step
    out = llm.generate([{"prompt_token_ids": [6, 7]}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and out[0].prompt_token_ids == [6, 7] and len(out[0].outputs[0].token_ids) == 3
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.engine.kv_manager.pool.check_accounting()
    assert llm.engine.kv_manager.pool.num_free_blocks == llm.engine.kv_manager.pool.usable_blocks


def test_chat_renders_the_template_as_transformers_does(llm):
    tok = llm.get_tokenizer()
    one = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    two = [{"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = llm.chat([one, two], params, use_tqdm=False)
    for conversation, out in zip([one, two], outs):
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert out.prompt == text
        ref = llm.generate({"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]}, params,
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert llm.chat(two, params, use_tqdm=False)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="chat template"):
        llm.chat(two, params, chat_template="{{ messages[5]['x'] }}", use_tqdm=False)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = llm.chat(two, params, tools=tools, use_tqdm=False)[0]
    assert with_tools.prompt == tok.apply_chat_template(two, tools=tools, tokenize=False, add_generation_prompt=True)
    assert '"get_weather"' in with_tools.prompt


def test_generation_config_gives_defaults_to_requests_that_give_none(llama_dir, tmp_path):
    import json
    import shutil

    from sageinfer.gateway.protocol import CompletionRequest
    model = tmp_path / "with-gen-config"
    shutil.copytree(llama_dir, model)
    gen = json.loads((model / "generation_config.json").read_text()) if (model / "generation_config.json").exists() else {}
    gen.update(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05)
    (model / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(model), dtype="float32", num_gpu_blocks_override=128, show_progress=False)
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.top_p, default.top_k, default.repetition_penalty) == (0.6, 0.9, 20, 1.05)
    defaults = llm.engine.inputs.sampling_defaults
    given = CompletionRequest(prompt="x", temperature=0.0, top_k=5).sampling_params(defaults)
    assert (given.temperature, given.top_p, given.top_k, given.max_tokens) == (0.0, 0.9, 5, 16)
    plain = LLM(str(model), dtype="float32", num_gpu_blocks_override=128, show_progress=False,
                generation_config="vllm").get_default_sampling_params()
    assert (plain.temperature, plain.top_k) == (1.0, 0)
    with pytest.raises(ValueError, match="generation_config"):
        LLM(str(model), dtype="float32", num_gpu_blocks_override=128, show_progress=False,
            generation_config=str(tmp_path / "nowhere"))


def test_bad_words_are_never_generated(llm):
    tok = llm.get_tokenizer()
    plain = _greedy(llm, "The capital of", max_tokens=12, ignore_eos=True).token_ids
    # A word of two tokens that greedy decoding produces, as the tokenizer reads it back.
    word = next(tok.decode(plain[i:i + 2]) for i in range(len(plain) - 1)
                if tok.encode(tok.decode(plain[i:i + 2]), add_special_tokens=False) == plain[i:i + 2]
                and tok.decode(plain[i:i + 2]).strip())
    banned = _greedy(llm, "The capital of", max_tokens=12, ignore_eos=True, bad_words=[word])
    params = SamplingParams(bad_words=[word])
    llm.engine.check_sampling_params(params)
    assert params.bad_words_token_ids and all(
        banned.token_ids[i:i + len(w)] != w for w in params.bad_words_token_ids for i in range(len(banned.token_ids)))
    assert banned.token_ids != plain
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[""])


def test_start_up_freezes_its_heap_and_the_next_engine_thaws_it(llama_dir, monkeypatch):
    """Start-up's objects are frozen out of the collector's full passes (each walked them all: 100-200 ms a pass);
    building another engine gives them back, so an engine dropped meanwhile is collected, reference cycles and
    all, before the new one loads its model."""
    import gc
    import weakref

    import sageinfer.engine.engine as engine_module
    first = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=16, max_model_len=64, show_progress=False)
    assert gc.get_freeze_count() > 10 * len(gc.get_objects())  # full passes now walk a small remainder
    engine = weakref.ref(first.engine)
    first.engine.itself = first.engine  # a cycle: only the collector frees it
    del first
    alive_at_load = []
    runner = engine_module.ModelRunner
    monkeypatch.setattr(engine_module, "ModelRunner", lambda *a, **k: alive_at_load.append(engine()) or runner(*a, **k))
    second = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=16, max_model_len=64, show_progress=False)
    assert alive_at_load == [None] and gc.get_freeze_count() > 0
    assert second.generate(["hi"], use_tqdm=False)[0].outputs[0].token_ids
