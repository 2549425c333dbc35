"""A reasoning model's thinking split from its answer (`--reasoning-parser`): the text between <think> and
</think> goes to the message's `reasoning` (and `reasoning_content`, its older name), the rest to `content`.

Whether the output begins inside the thinking is read from the prompt, not guessed: templates such as
DeepSeek-R1's and Qwen3-2507's end the prompt with an open <think>, so the output holds only the closing
tag; Qwen3's first template leaves the tag to the model; `enable_thinking: false` closes an empty block in
the prompt, so the output is all answer. An output cut off before </think> is all thinking.
"""
from __future__ import annotations

from sageinfer.gateway.tool_calls import partial_tag_suffix


class ThinkTagReasoningParser:
    start, end = "<think>", "</think>"

    def starts_in_reasoning(self, prompt_text: str | None) -> bool:
        """Whether the prompt leaves a thinking block open, so that the output begins in it."""
        return bool(prompt_text) and prompt_text.rstrip().endswith(self.start)

    def end_token_id(self, tokenizer) -> int | None:
        """The closing tag's token, where the vocabulary has it as one token (a grammar binds after it)."""
        ids = tokenizer.encode(self.end, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def split(self, text: str, in_reasoning: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for a part it has not."""
        stream = self.stream(in_reasoning)
        reasoning, content = stream.feed(text)
        more_reasoning, more_content = stream.finish()
        reasoning, content = reasoning + more_reasoning, content + more_content
        return (reasoning if stream.thought else None), (content or None)

    def stream(self, in_reasoning: bool) -> "ReasoningStream":
        return ReasoningStream(self, in_reasoning)


class ReasoningStream:
    """The same split over a streamed output: feed each text delta, get (reasoning, content) to send. A tag
    split across deltas is held back until it is whole."""

    def __init__(self, parser: ThinkTagReasoningParser, in_reasoning: bool):
        self.parser = parser
        self.state = "thinking" if in_reasoning else "opening"  # opening: the output may yet begin with <think>
        self.thought = in_reasoning
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.pending += delta
        reasoning = content = ""
        if self.state == "opening":
            head = self.pending.lstrip()
            if head.startswith(self.parser.start):
                self.pending, self.state, self.thought = head[len(self.parser.start):], "thinking", True
            elif self.parser.start.startswith(head):
                return "", ""  # blanks, or the beginning of the tag: not known yet
            else:
                self.state = "answering"
        if self.state == "thinking":
            i = self.pending.find(self.parser.end)
            if i < 0:
                cut = len(self.pending) - partial_tag_suffix(self.pending, self.parser.end)
                reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return reasoning, ""
            reasoning, self.pending, self.state = self.pending[:i], self.pending[i + len(self.parser.end):], "after"
        if self.state == "after":  # the blanks between </think> and the answer are dropped
            self.pending = self.pending.lstrip()
            if not self.pending:
                return reasoning, ""
            self.state = "answering"
        content, self.pending = self.pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held back when the output ends: a tag's beginning that never became one."""
        rest, self.pending = self.pending, ""
        if self.state == "thinking":
            return rest, ""
        return "", (rest if self.state != "after" else "")


class ReplyThinking:
    """One chat reply's split of thinking from answer (with no parser: all answer), and the fields it adds."""

    def __init__(self, parser, in_reasoning: bool, include: bool):
        self.parser, self.in_reasoning, self.include = parser, in_reasoning, include

    def split(self, text: str) -> tuple[str | None, str | None]:
        return (None, text) if self.parser is None else self.parser.split(text, self.in_reasoning)

    def stream(self) -> "ReplyThinkingStream":
        return ReplyThinkingStream(None if self.parser is None else self.parser.stream(self.in_reasoning))

    def fields(self, reasoning: str | None) -> dict:
        """The message's (or delta's) thinking under vLLM's name and its older one, which other servers use."""
        if not reasoning or not self.include:
            return {}
        return {"reasoning": reasoning, "reasoning_content": reasoning}


class ReplyThinkingStream:
    """One streamed choice's split (with no parser: every delta is content)."""

    def __init__(self, stream):
        self.stream = stream

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        if self.stream is None:
            return "", text
        reasoning, content = self.stream.feed(text)
        if finished:
            more_reasoning, more_content = self.stream.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return reasoning, content


REASONING_PARSERS = {"qwen3": ThinkTagReasoningParser, "deepseek_r1": ThinkTagReasoningParser}
