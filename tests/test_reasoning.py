"""Reasoning models: the <think> block split from the answer (--reasoning-parser), whole and streamed, and
through the server with chat_template_kwargs turning thinking on and off."""
import json

import httpx
import openai
import pytest

from sageinfer import LLM, SamplingParams
from sageinfer.gateway.reasoning import ThinkTagReasoningParser
from server_util import ServerProcess

# (output, whether the prompt left a block open) -> (reasoning, content)
CASES = [
    ("<think>\nweigh it</think>\n\nParis.", False, ("\nweigh it", "Paris.")),   # Qwen3: the model opens it
    ("  <think>a</think>b", False, ("a", "b")),
    ("weigh it</think>\n\nParis.", True, ("weigh it", "Paris.")),               # R1 / Qwen3-2507: the prompt does
    ("still thinking when cut off", True, ("still thinking when cut off", None)),
    ("Paris.", False, (None, "Paris.")),                                        # enable_thinking false
    ("Paris. <think>x</think>", False, (None, "Paris. <think>x</think>")),      # a tag inside the answer is text
    ("<thin", False, (None, "<thin")),
    ("a</think", True, ("a</think", None)),
    ("</think>", True, ("", None)),
    ("", False, (None, None)),
]


def test_split_by_where_the_output_begins():
    parser = ThinkTagReasoningParser()
    for text, in_reasoning, expected in CASES:
        assert parser.split(text, in_reasoning) == expected, (text, in_reasoning)
    assert parser.starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not parser.starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not parser.starts_in_reasoning("<|im_start|>assistant\n") and not parser.starts_in_reasoning(None)


def test_streaming_in_any_pieces_gives_what_splitting_the_whole_gives():
    parser = ThinkTagReasoningParser()
    for text, in_reasoning, (reasoning, content) in CASES:
        for size in (1, 2, 3, 5, len(text) or 1):
            stream = parser.stream(in_reasoning)
            parts = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
            assert "".join(r for r, _ in parts) == (reasoning or ""), (text, size)
            assert "".join(c for _, c in parts) == (content or ""), (text, size)


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = ServerProcess(llama_dir, "--max-num-seqs", "16", "--reasoning-parser", "qwen3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-test")


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir, dtype="float32", num_gpu_blocks_override=128, show_progress=False)


QUESTION = [{"role": "user", "content": "The capital of France?"}]


def _raw_output(offline, thinking, max_tokens, **params):
    """The model's text for the question, as the server would render it, without any split."""
    kwargs = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
    out = offline.chat(QUESTION, SamplingParams(temperature=0, max_tokens=max_tokens, **params), use_tqdm=False,
                       **kwargs)
    return out[0].outputs[0].text


def _streamed(client, **kwargs):
    reasoning = content = ""
    for chunk in client.chat.completions.create(model="tiny", messages=QUESTION, stream=True, **kwargs):
        delta = chunk.choices[0].delta.model_dump()
        assert delta.get("reasoning") == delta.get("reasoning_content")
        reasoning += delta.get("reasoning") or ""
        content += delta.get("content") or ""
    return reasoning, content


def test_thinking_on_off_and_unset_through_the_server(client, offline):
    parser = ThinkTagReasoningParser()
    for thinking in (True, False, None):
        extra = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
        raw = _raw_output(offline, thinking, 20)
        out = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=20, temperature=0,
                                             extra_body=extra)
        message = out.choices[0].message.model_dump()
        reasoning, content = parser.split(raw, in_reasoning=thinking is True)
        assert (message.get("reasoning"), message["content"]) == (reasoning or None, content), thinking
        assert message.get("reasoning_content") == message.get("reasoning")
        if thinking is True:
            assert reasoning  # the open block: the output is thinking until </think>
        else:
            assert message.get("reasoning") is None and content == raw  # the random model writes no <think>
        assert _streamed(client, max_tokens=20, temperature=0, extra_body=extra) == (reasoning or "", content or "")


def test_a_format_binds_after_the_thinking(client, offline):
    """response_format with the block open: the thinking runs free, the answer after </think> follows the
    format (a strong bias makes the tiny model close its block)."""
    end = offline.get_tokenizer().convert_tokens_to_ids("</think>")
    out = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=30, temperature=0, logit_bias={str(end): 100},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "guided_choice": ["Paris", "Lyon"]})
    assert out.choices[0].message.content in ("Paris", "Lyon") and out.choices[0].finish_reason == "stop"
    # Without thinking the format binds from the first token.
    out = client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=30, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "guided_choice": ["Paris", "Lyon"]})
    assert out.choices[0].message.content in ("Paris", "Lyon")
    assert out.choices[0].message.model_dump().get("reasoning") is None


def test_the_model_opening_its_own_block_and_include_reasoning(client):
    """Qwen3's first template leaves <think> to the model (forced here by a regex that binds from the start)."""
    regex = r"<think>Rivers, then cities\.</think>\n\nParis\."
    out = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=60, temperature=0,
                                         extra_body={"guided_regex": regex})
    message = out.choices[0].message.model_dump()
    assert (message["reasoning"], message["content"]) == ("Rivers, then cities.", "Paris.")
    assert _streamed(client, max_tokens=60, temperature=0, extra_body={"guided_regex": regex}) == \
        ("Rivers, then cities.", "Paris.")
    hidden = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=60, temperature=0,
                                            extra_body={"guided_regex": regex, "include_reasoning": False})
    message = hidden.choices[0].message.model_dump()
    assert message["content"] == "Paris." and message.get("reasoning") is None
    assert message.get("reasoning_content") is None


def test_chat_template_kwargs_and_earlier_thinking_reach_the_template(server, offline):
    tok = offline.get_tokenizer()
    history = QUESTION + [{"role": "assistant", "content": "Paris.", "reasoning_content": "Rivers."},
                          {"role": "user", "content": "And Italy?"}]
    for kwargs in ({"enable_thinking": True}, {"enable_thinking": False}, None):
        body = {"messages": history, **({} if kwargs is None else {"chat_template_kwargs": kwargs})}
        r = httpx.post(server.base_url + "/tokenize", json=body, headers=server.headers)
        assert r.status_code == 200, r.text
        expected = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **(kwargs or {}))
        assert "<think>\nRivers.\n</think>" in expected
        assert r.json()["tokens"] == tok(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kwargs", [{"tokenize": True}, {"messages": []}, {"not a name": 1}, [1], "x"])
def test_bad_chat_template_kwargs_get_400_and_the_server_keeps_serving(server, client, kwargs):
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers,
                   json={"model": "tiny", "messages": QUESTION, "max_tokens": 2, "chat_template_kwargs": kwargs})
    assert r.status_code == 400, r.text
    assert "chat_template_kwargs" in json.dumps(r.json()["error"])
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).choices[0].finish_reason


def test_offline_chat_takes_template_kwargs_and_refuses_bad_ones(offline):
    on, off = (offline.chat(QUESTION, SamplingParams(max_tokens=1), use_tqdm=False,
                            chat_template_kwargs={"enable_thinking": value})[0].prompt for value in (True, False))
    assert on.endswith("<think>\n") and off.endswith("</think>\n\n")
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        offline.chat(QUESTION, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})


def test_a_reply_continues_the_final_assistant_message(client, offline):
    """continue_final_message: the prompt ends inside the assistant's words, which the reply goes on from."""
    partial = QUESTION + [{"role": "assistant", "content": "The capital is"}]
    params = SamplingParams(temperature=0, max_tokens=8)
    (expected,) = offline.chat(partial, params, use_tqdm=False, add_generation_prompt=False,
                               continue_final_message=True)
    assert expected.prompt.endswith("The capital is")
    out = client.chat.completions.create(model="tiny", messages=partial, max_tokens=8, temperature=0,
                                         extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert out.choices[0].message.content == expected.outputs[0].text
    for body, wrong in (({"continue_final_message": True}, "both"), ({"add_generation_prompt": False,
                                                                      "continue_final_message": True}, "assistant")):
        with pytest.raises(openai.BadRequestError, match=wrong):
            client.chat.completions.create(model="tiny", messages=partial if wrong == "both" else QUESTION,
                                           max_tokens=2, extra_body=body)


def test_earlier_thinking_counts_toward_the_texts_length_limit(server):
    """A prompt's text is bounded before it is tokenized, earlier thinking included."""
    history = QUESTION + [{"role": "assistant", "content": "Paris.", "reasoning_content": "x " * 500_000},
                          {"role": "user", "content": "And Italy?"}]
    r = httpx.post(server.base_url + "/v1/chat/completions", headers=server.headers, timeout=60,
                   json={"model": "tiny", "messages": history, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
