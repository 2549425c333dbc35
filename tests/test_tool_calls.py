"""Tool calls: the Hermes parser on whole and streamed outputs."""
import json

from sageinfer.gateway.tool_calls import HermesToolParser

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
