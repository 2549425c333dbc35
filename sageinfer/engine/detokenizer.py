"""Incremental detokenization with stop strings.

Text is the difference between decoding a short window of tokens with and without the newest ones;
a window that ends inside a multi-byte character decodes to U+FFFD and is held back until the
character completes, so Chinese text comes out whole.
"""
from __future__ import annotations

# Tokens of context kept before the unread ones, so that merges at the seam decode as in full text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 stop: list[str], include_stop_str_in_output: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool) -> str | None:
        """Append a token's text; returns the stop string if one now appears in the output."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return None
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        start = max(len(self.text) - self.max_stop_len + 1, 0)
        self.text += delta
        if check_stop and self.stop:
            return self._truncate_at_stop(start)
        return None

    def flush(self) -> None:
        """At the end, release text held back for an unfinished character (it stays U+FFFD)."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) > len(prefix_text):
            self.text += full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.token_ids)

    def _truncate_at_stop(self, search_from: int) -> str | None:
        found = None
        for stop in self.stop:
            pos = self.text.find(stop, search_from)
            if pos != -1 and (found is None or pos < found[0]):
                found = (pos, stop)
        if found is None:
            return None
        pos, stop = found
        self.text = self.text[:pos + len(stop)] if self.include_stop else self.text[:pos]
        return stop

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
