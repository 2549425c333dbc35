"""Structured output (xgrammar): what a request's grammar allows is all it generates, and requests
with and without a grammar share steps without changing each other's tokens."""
import json
import re

import numpy as np
import pytest
import torch

from greedy_words import two_token_words
from ranks import needs_ranks
from sageinfer import LLM, SamplingParams
from sageinfer.layers.sampler import unpack_bitmask
from sageinfer.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "colour", "tags"],
          "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


def _valid(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"ok", "colour", "tags"} and isinstance(obj["ok"], bool)
            and obj["colour"] in ("red", "green", "blue") and isinstance(obj["tags"], list)
            and len(obj["tags"]) <= 3 and all(t in ("a", "b") for t in obj["tags"]))


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, show_progress=False)


def _texts(llm, params, prompt="The answer:"):
    outs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_json_schema_is_honoured_when_sampling(llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA))
              for s in range(6)]
    for text, reason in _texts(llm, params):
        assert reason == "stop", text
        assert _valid(json.loads(text)), text


def test_regex_choice_grammar_and_json_object(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "it depends"]), lambda t: t in ("yes", "no", "it depends")),
        (StructuredOutputsParams(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9]'),
         lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, check in cases:
        params = [SamplingParams(temperature=0.9, seed=s, max_tokens=60, structured_outputs=spec) for s in range(4)]
        for text, reason in _texts(llm, params):
            if spec.json_object and reason == "length":
                continue  # any JSON object may be longer than max_tokens; what was made must still be a prefix
            assert reason == "stop" and check(text), (spec, text)


def test_requests_with_and_without_a_grammar_share_steps(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = _texts(llm, [plain])[0]
    mixed = _texts(llm, [plain, SamplingParams(temperature=0.7, seed=3, max_tokens=60,
                                               structured_outputs=StructuredOutputsParams(json=SCHEMA)), plain])
    assert mixed[0] == alone and mixed[2] == alone
    assert _valid(json.loads(mixed[1][0]))


def test_n_samples_each_follow_the_grammar(llm):
    out = llm.generate("Pick:", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10,
                                               structured_outputs=StructuredOutputsParams(choice=["x", "yy", "zzz"])),
                       use_tqdm=False)[0]
    assert [c.text in ("x", "yy", "zzz") for c in out.outputs] == [True] * 3


def test_a_grammar_after_a_token_lets_the_output_run_free_until_that_token(llm):
    """A reasoning model's thinking runs free and its answer follows the format: the grammar binds from the
    token after after_token_id, and not at all while that token has not come."""
    plain = llm.generate("The answer:", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(3, len(plain)) if plain[i] not in plain[:i])
    choices = ["yes", "no", "it depends"]
    spec = StructuredOutputsParams(choice=choices, after_token_id=plain[k])
    out = llm.generate("The answer:", SamplingParams(temperature=0, max_tokens=40, structured_outputs=spec),
                       use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids[:k + 1]) == list(plain[:k + 1])  # free: the plain greedy tokens, the token itself
    answer = llm.get_tokenizer().decode(out.token_ids[k + 1:], skip_special_tokens=True)
    assert answer in choices and out.finish_reason == "stop"
    never = next(t for t in range(llm.get_tokenizer().vocab_size) if t not in plain)
    free = llm.generate("The answer:", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      structured_outputs=StructuredOutputsParams(
                                                          regex="[0-9]+", after_token_id=never)),
                        use_tqdm=False)[0].outputs[0]
    assert list(free.token_ids) == list(plain)
    with pytest.raises(ValueError, match="after_token_id"):
        StructuredOutputsParams(regex="a", after_token_id=-1)
    with pytest.raises(ValueError, match="after_token_id"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a", after_token_id=10**6)),
                     use_tqdm=False)


def test_bad_specs_are_value_errors(llm):
    for spec in ({"regex": "[0-9"}, {"json": {"type": "objec"}}, {"grammar": "root ::= undefined_rule"}):
        with pytest.raises(ValueError, match="could not be compiled"):
            llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    for fields in ({}, {"regex": "a", "choice": ["b"]}, {"choice": []}, {"json": 5}):
        with pytest.raises(ValueError, match="structured outputs"):
            StructuredOutputsParams(**fields)
    assert llm.generate("still serving", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_a_grammar_the_other_limits_leave_no_token_for_fails_that_request_alone_as_its_own_fault(llm):
    """allowed_token_ids that hold no token the grammar allows: the request ends with an error saying so, marked
    as the request's fault (a server answers 400), and the request beside it is served."""
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    alone = llm.generate("beside", plain, use_tqdm=False)[0].outputs[0].token_ids
    token_ids = llm.get_tokenizer().encode("a", add_special_tokens=False)
    no_a = [t for t in range(1, 40) if t not in token_ids]
    conflicted = SamplingParams(max_tokens=4, allowed_token_ids=no_a,
                                structured_outputs=StructuredOutputsParams(choice=["a"]))
    failed, served = llm.generate(["x", "beside"], [conflicted, plain], use_tqdm=False)
    assert failed.outputs[0].finish_reason == "error" and failed.bad_request
    assert "no token it allows was left by the request's other limits" in failed.error
    assert served.outputs[0].token_ids == alone and served.error is None and not served.bad_request


def test_a_grammar_needs_a_tokenizer(llama_dir):
    bare = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, skip_tokenizer_init=True, show_progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.generate({"prompt_token_ids": [1, 2]},
                      SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")), use_tqdm=False)


def test_unpack_bitmask_is_bit_t_of_word_t_over_32():
    rng = np.random.default_rng(0)
    allowed = rng.random((3, 70)) < 0.3
    words = np.zeros((3, 3), dtype=np.uint32)
    for row, t in zip(*np.nonzero(allowed)):
        words[row, t // 32] |= np.uint32(1 << (t % 32))
    unpacked = unpack_bitmask(torch.from_numpy(words.view(np.int32)), 70)
    assert torch.equal(unpacked, torch.from_numpy(allowed))


@needs_ranks(2)
def test_tp2_follows_the_grammar_as_tp1(llama_dir):
    """Each rank draws the tokens rank 0 draws: the grammars' masks and the bad words' bans reach the workers
    after the step in flight is read (the draws are deferred until then)."""
    words = two_token_words(llama_dir, "Hello, my name is", 16)[:3]  # that the bad-words request would write
    assert words
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMA))
              for s in range(3)] + [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, bad_words=words)]
    # Choices of two-letter tokens past the first rank's half of the vocabulary (a wrong draw there would show)
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=20, structured_outputs=StructuredOutputsParams(
        choice=["angeelerinisat", "heatisangeel", "erinheatan"])) for s in (8, 9)]
    texts = {}
    for tp in (1, 2):
        engine = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=256, tensor_parallel_size=tp,
                     show_progress=False)
        outs = engine.generate(["The answer:"] * 4 + ["Hello, my name is"] + ["Pick:"] * 2, params, use_tqdm=False)
        texts[tp] = [(o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].token_ids) for o in outs]
        engine.engine.shutdown()
    assert texts[2] == texts[1]
    assert all(_valid(json.loads(t)) for t, _, _ in texts[2][:3])
    assert not any(word in texts[2][4][0] for word in words)
    assert all(t in ("angeelerinisat", "heatisangeel", "erinheatan") for t, _, _ in texts[2][5:])


def test_a_steps_bitmasks_filled_by_threads_are_each_grammars_own(llm, monkeypatch):
    """Many grammar rows are filled by xgrammar's threads in one call: each row is what that grammar alone
    allows (matchers walked to different states by their own greedy tokens), and generation is unchanged."""
    from sageinfer.structured_output import grammar as grammar_module
    specs = [StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2,4}"),
             StructuredOutputsParams(json_object=True)]
    llm.engine._compile_grammar(SamplingParams(structured_outputs=specs[0]))  # the engine's compiler made
    compiler = llm.engine.grammars
    rng = np.random.default_rng(0)
    grammars = []
    for i in range(40):
        g = compiler.matcher(compiler.compile(specs[i % 3]))
        for _ in range(i % 7):  # walk each to its own state: random allowed tokens
            bits = unpack_bitmask(torch.from_numpy(compiler.next_bitmasks([g])), compiler.vocab_size)
            allowed = np.nonzero(bits[0])[0]
            allowed = [t for t in allowed.tolist() if t not in llm.engine.eos_token_ids]
            if not allowed:
                break
            g.accept(int(rng.choice(allowed)))
        grammars.append(g)
    alone = np.stack([compiler.next_bitmasks([g])[0] for g in grammars])
    monkeypatch.setattr(grammar_module, "THREADED_FILL_MIN_ROWS", 8)
    compiler._fill_threaded = __import__("xgrammar").BatchGrammarMatcher(max_threads=3)
    together = compiler.next_bitmasks(grammars)
    assert np.array_equal(together, alone) and len({row.tobytes() for row in alone}) > 3

    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=specs[s % 3])
              for s in range(12)]
    threaded = _texts(llm, params)
    monkeypatch.setattr(grammar_module, "THREADED_FILL_MIN_ROWS", 1 << 30)
    assert _texts(llm, params) == threaded
