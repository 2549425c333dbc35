"""Tool calls: the Hermes and Llama 3 JSON parsers on whole and streamed outputs."""
import json

from sageinfer.gateway.tool_calls import HermesToolParser, Llama3JsonToolParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def test_parse_splits_content_and_calls():
    parser = HermesToolParser()
    content, calls = parser.parse("Let me look. " + CALL + "\n" + CALL.replace("Paris", "Rome"))
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Rome", "days": 2})]
    assert len({c.id for c in calls}) == 2 and calls[0].id.startswith("chatcmpl-tool-")
    assert parser.parse(CALL)[0] is None
    assert parser.parse("no calls here") == ("no calls here", [])
    broken = "x <tool_call>{not json}</tool_call>"
    assert parser.parse(broken) == (broken, [])
    unclosed = CALL[:-len("</tool_call>")]  # the model stopped at its end token
    assert parser.parse(unclosed)[1][0].name == "get_weather"


def test_streaming_in_any_pieces_gives_what_parsing_the_whole_gives():
    text = "Sure <tool_ <- not a tag. " + CALL + " " + CALL.replace("Paris", "Oslo")
    for size in (1, 2, 3, 7, 50, len(text)):
        stream = HermesToolParser().stream()
        content, calls = "", []
        for i in range(0, len(text), size):
            c, k = stream.feed(text[i:i + size])
            content, calls = content + c, calls + k
        c, k = stream.finish()
        content, calls = content + c, calls + k
        assert content == "Sure <tool_ <- not a tag.  "
        assert [(k["index"], k["function"]["name"], json.loads(k["function"]["arguments"])["city"]) for k in calls] == \
            [(0, "get_weather", "Paris"), (1, "get_weather", "Oslo")]
    stream = HermesToolParser().stream()
    assert stream.feed("a <tool_call>{bad}</tool_call> b") == ("a <tool_call>{bad}</tool_call> b", [])


LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris; France", "days": 2}}'
LLAMA_CASES = [  # reply -> (content, [(name, arguments)])
    (LLAMA_CALL, (None, [("get_weather", {"city": "Paris; France", "days": 2})])),
    ("<|python_tag|>" + LLAMA_CALL + "; " + LLAMA_CALL.replace("Paris", "Rome"),
     (None, [("get_weather", {"city": "Paris; France", "days": 2}),
             ("get_weather", {"city": "Rome; France", "days": 2})])),
    ("  " + LLAMA_CALL.replace("parameters", "arguments"),
     (None, [("get_weather", {"city": "Paris; France", "days": 2})])),
    ("The weather is fine. {not a call}", ("The weather is fine. {not a call}", [])),
    ('{"no": "name"}', ('{"no": "name"}', [])),
    (LLAMA_CALL[:-5], (LLAMA_CALL[:-5], [])),  # cut off: text, as it came
    ("", ("", [])),
]


def test_llama3_json_calls_whole():
    parser = Llama3JsonToolParser()
    for text, (content, calls) in LLAMA_CASES:
        got_content, got_calls = parser.parse(text)
        assert (got_content, [(c.name, json.loads(c.arguments)) for c in got_calls]) == (content, calls), text


def test_llama3_json_streamed_in_any_pieces():
    """Calls come whole, each once its JSON closes; a reply that is not calls streams as content. (A reply
    whose calls stop parsing part-way sends the rest as text, after the calls that did parse.)"""
    for text, (content, calls) in LLAMA_CASES:
        for size in (1, 2, 5, 13, len(text) or 1):
            stream = Llama3JsonToolParser().stream()
            parts = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
            got_calls = [k for _, ks in parts for k in ks]
            assert [(k["index"], k["function"]["name"], json.loads(k["function"]["arguments"])) for k in got_calls] \
                == [(i, name, args) for i, (name, args) in enumerate(calls)], (text, size)
            assert "".join(c for c, _ in parts) == (content or ""), (text, size)
    content, calls = Llama3JsonToolParser().stream().feed(LLAMA_CALL + ";")
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"]  # sent as its JSON closes


def test_llama3_json_through_the_server(llama_dir):
    """--tool-call-parser llama3_json: a reply that is a call (a regex makes the tiny model write one) comes back
    as tool_calls, streamed and not."""
    import openai

    from server_util import ServerProcess
    srv = ServerProcess(llama_dir, "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json")
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="sk-test")
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Paris?"}], tools=tools, max_tokens=80,
                      extra_body={"guided_regex": r'\{"name": "get_weather", "parameters": \{"city": "Paris"\}\}'})
        message = client.chat.completions.create(**kwargs).choices[0].message
        assert message.content is None and json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        calls = [c for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
        assert [(c.index, c.function.name) for c in calls] == [(0, "get_weather")]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        srv.stop()
