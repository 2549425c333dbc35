"""Tool calls in a chat reply: parsed out of the model's text for tool_choice "auto"
(`--tool-call-parser`), or the whole output under "required" and a named function.

Hermes format, used by Qwen 2.5 / 3, Hermes 2 / 3 and others: each call is a JSON object
{"name": ..., "arguments": {...}} between <tool_call> and </tool_call>; text before the first call
is the message's content. A block that is not such JSON is left in the content, as text.
Llama 3's JSON format (llama3_json): the reply is the calls themselves, {"name": ..., "parameters": ...}.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from sageinfer.gateway.protocol import NamedToolChoice


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_tool_call(name: str, arguments) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text, f"chatcmpl-tool-{uuid.uuid4().hex[:24]}")


class HermesToolParser:
    start, end = "<tool_call>", "</tool_call>"

    def call_of(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        return new_tool_call(obj["name"], obj.get("arguments", obj.get("parameters", {})))

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole output; the text unchanged when no call parses."""
        if self.start not in text:
            return text, []
        blocks = re.findall(re.escape(self.start) + r"(.*?)(?:" + re.escape(self.end) + r"|$)", text, re.S)
        calls = [self.call_of(b.strip()) for b in blocks]
        if not calls or any(c is None for c in calls):
            return text, []
        content = text[:text.index(self.start)].strip()
        return content or None, calls

    def stream(self) -> "ToolCallStream":
        return ToolCallStream(self)


class ToolCallStream:
    """The same split over a streamed output: feed each text delta, get the content to send and the
    tool calls completed by it (each sent whole, in one delta, as OpenAI's clients accept)."""

    def __init__(self, parser: HermesToolParser):
        self.parser = parser
        self.pending = ""
        self.in_call = False
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.pending += delta
        content, calls = "", []
        start, end = self.parser.start, self.parser.end
        while True:
            if not self.in_call:
                i = self.pending.find(start)
                if i < 0:
                    keep = partial_tag_suffix(self.pending, start)  # may be the beginning of a tag
                    content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return content, calls
                content += self.pending[:i]
                self.pending, self.in_call = self.pending[i + len(start):], True
            else:
                j = self.pending.find(end)
                if j < 0:
                    return content, calls
                body, self.pending, self.in_call = self.pending[:j], self.pending[j + len(end):], False
                content, calls = self._emit(body, content, calls)

    def finish(self) -> tuple[str, list[dict]]:
        """What is left when the output ends (a call may end at the stop token, with no closing tag)."""
        content, calls = "", []
        if self.in_call:
            content, calls = self._emit(self.pending, content, calls, closed=False)
        else:
            content = self.pending
        self.pending, self.in_call = "", False
        return content, calls

    def _emit(self, body: str, content: str, calls: list, closed: bool = True) -> tuple[str, list]:
        call = self.parser.call_of(body.strip())
        if call is None:
            return content + self.parser.start + body + (self.parser.end if closed else ""), calls
        calls.append(call.to_openai(self.num_calls))
        self.num_calls += 1
        return content, calls


def partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that begins tag."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class Llama3JsonToolParser:
    """Llama 3.1 / 3.2 / 3.3's JSON format: the whole reply is the call(s), {"name": ..., "parameters": {...}},
    several separated by ";", after <|python_tag|> where special tokens are kept. A reply that does not begin
    with one is content."""
    tag = "<|python_tag|>"

    def call_of(self, obj) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        return new_tool_call(obj["name"], obj.get("parameters", obj.get("arguments", {})))

    def body(self, text: str) -> str | None:
        """The text the calls are in, or None where the reply is not calls."""
        head = text.lstrip()
        if head.startswith(self.tag):
            head = head[len(self.tag):].lstrip()
        return head if head.startswith("{") else None

    def next_call(self, text: str) -> tuple[object, int] | None:
        """(the JSON value that text begins with, its length), or None while it is not whole."""
        try:
            return json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        rest = self.body(text)
        if rest is None:
            return text, []
        calls = []
        while rest:
            found = self.next_call(rest)
            call = found and self.call_of(found[0])
            if call is None:
                return text, []  # not calls after all: the text as it came
            calls.append(call)
            rest = rest[found[1]:].lstrip().removeprefix(";").lstrip()
        return None, calls

    def stream(self) -> "Llama3JsonStream":
        return Llama3JsonStream(self)


class Llama3JsonStream:
    """The same over a streamed reply: content as it comes where it is not calls; each call once its JSON is
    whole. Calls that turn out not to parse are sent as content at the end, as parse() leaves them."""

    def __init__(self, parser: Llama3JsonToolParser):
        self.parser = parser
        self.text = ""        # the whole reply so far
        self.mode = None      # None: undecided (blanks, part of the tag); "content"; "calls"
        self.consumed = 0     # where in text the calls not yet sent begin
        self.num_calls = 0
        self.broken = False

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if self.mode is None:
            head = self.text.lstrip()
            if not head or self.parser.tag.startswith(head) or (head.startswith(self.parser.tag)
                                                                and not head[len(self.parser.tag):].strip()):
                return "", []
            body = self.parser.body(self.text)
            if body is None:
                self.mode = "content"
                return self.text, []
            self.mode, self.consumed = "calls", len(self.text) - len(body)
        elif self.mode == "content":
            return delta, []
        return "", self._whole_calls()

    def _whole_calls(self) -> list[dict]:
        out = []
        while not self.broken:
            rest = self.text[self.consumed:]
            stripped = rest.lstrip().removeprefix(";").lstrip()
            if not stripped:
                break
            found = self.parser.next_call(stripped)
            if found is None:
                break  # not whole yet
            call = self.parser.call_of(found[0])
            if call is None:
                self.broken = True
                break
            self.consumed += len(rest) - len(stripped) + found[1]
            out.append(call.to_openai(self.num_calls))
            self.num_calls += 1
        return out

    def finish(self) -> tuple[str, list[dict]]:
        if self.mode is None:
            return self.text, []
        rest = self.text[self.consumed:]
        if self.mode == "calls" and (self.broken or rest.strip(" \n;")):
            # What is left does not parse: the calls already sent stand, and the rest goes as text.
            return rest, []
        return "", []


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


class ToolCallOutput:
    """A chat reply's message under its tool_choice: "none" text only; "auto" tool calls parsed out of
    the text; "required" a JSON list of {name, parameters} (held to it by a grammar); a named
    function its arguments (likewise)."""

    def __init__(self, tool_choice, parser, parallel: bool = True):
        self.choice, self.parser = tool_choice, parser
        self.max_calls = None if parallel else 1  # parallel_tool_calls false: the first call only

    def _forced_calls(self, text: str) -> list[ToolCall] | None:
        try:
            if self.choice == "required":
                return [new_tool_call(call["name"], call["parameters"]) for call in json.loads(text)]
            json.loads(text)
            return [new_tool_call(self.choice.function.name, text)]
        except (ValueError, KeyError, TypeError):
            return None  # cut short (max_tokens): left as text

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        if self.choice == "none":
            return {"role": "assistant", "content": text}, finish_reason
        if self.choice == "auto":
            content, calls = self.parser.parse(text)
        else:
            calls = self._forced_calls(text)
            content = None if calls else text
            calls = calls or []
        calls = calls[:self.max_calls]
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
            if finish_reason == "stop" and self.choice != "none" and not isinstance(self.choice, NamedToolChoice):
                finish_reason = "tool_calls"
        return message, finish_reason

    def stream(self) -> "_ToolCallDeltas":
        return _ToolCallDeltas(self)


class _ToolCallDeltas:
    """One streamed choice: content as it comes, tool calls whole once each is complete."""

    def __init__(self, output: ToolCallOutput):
        self.output = output
        self.splitter = output.parser.stream() if output.choice == "auto" else None
        self.forced_text = "" if output.choice not in ("none", "auto") else None
        self.num_calls = 0

    def delta(self, text: str, finished: bool, finish_reason: str | None) -> tuple[dict, str | None]:
        calls = []
        if self.forced_text is not None:  # the whole output is the call: sent at the end
            self.forced_text += text
            text = ""
            if finished:
                message, _ = self.output.message(self.forced_text, finish_reason)
                text = message["content"] or ""
                calls = [{"index": i, **c} for i, c in enumerate(message.get("tool_calls", []))]
        elif self.splitter is not None:
            text, calls = self.splitter.feed(text)
            if finished:
                rest, more = self.splitter.finish()
                text, calls = text + rest, calls + more
            if self.output.max_calls is not None:
                calls = calls[:max(0, self.output.max_calls - self.num_calls)]
        self.num_calls += len(calls)
        delta = {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        if finished and self.num_calls and finish_reason == "stop" and not isinstance(self.output.choice,
                                                                                      NamedToolChoice):
            finish_reason = "tool_calls"
        return delta, finish_reason if finished else None
