"""Incremental detokenization with stop strings.

Text is the difference between decoding a short window of tokens with and without the newest ones;
a window that ends inside a multi-byte character decodes to U+FFFD and is held back until the
character completes, so Chinese text comes out whole.

Fast tokenizers (a Rust `tokenizers.Tokenizer` behind the Hugging Face one) take the same steps in
Rust instead (`DecodeStream`, primed with the prompt's last tokens): one call per token instead of
two decodes of the window, which matters because every sampled token of every running request
passes here on the engine's loop.
"""
from __future__ import annotations

import weakref

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers is a dependency; a build without DecodeStream decodes windows
    DecodeStream = None

# Tokens of context kept before the unread ones, so that merges at the seam decode as in full text.
_CONTEXT_TOKENS = 5
# Text whose decoded form a tokenizer's clean-up of spaces changes (" ." -> ".", " 's" -> "'s", ...): where the
# Hugging Face decode gives the Rust decode's text for it, that tokenizer cleans nothing up.
_CLEAN_UP_PROBE = "a . b , c ? d ! e 's f n't g 're h 've i 'm j ' k"
# Per tokenizer: its Rust tokenizer, or None (worked out once, not per request)
_RUST_BEHIND = weakref.WeakKeyDictionary()
# Per tokenizer: the text of each token decoded alone so far (logprobs name every top token of every position)
_TOKEN_TEXTS = weakref.WeakKeyDictionary()


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
        self.rust = _rust_tokenizer(tokenizer)
        self.token_texts = _token_texts(tokenizer)
        self.stream = None
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # (a prompt that ends inside a character: the stream would repeat its text; windows do not)
        if self.rust is not None and not self.rust.decode(context, skip_special_tokens).endswith("\ufffd"):
            self.stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        if self.rust is not None:  # the same text without the Hugging Face decode's per-call overhead
            return self.rust.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool) -> str | None:
        """Append a token's text; returns the stop string if one now appears in the output."""
        self.token_ids.append(token_id)
        if self.stream is not None:
            try:
                delta = self.stream.step(self.rust, token_id)
            except Exception:  # noqa: BLE001 - a sequence the stream cannot take: the window method from here on
                self.stream = None
                return self.add_token(self.token_ids.pop(), check_stop)
            if not delta:
                return None
            self.prefix_offset = self.read_offset  # as the window method keeps them (flush decodes a window)
            self.read_offset = len(self.token_ids)
        else:
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
        """A token's text alone (special tokens included), decoded once per tokenizer."""
        text = self.token_texts.get(token_id)
        if text is None:
            decode = self.rust.decode if self.rust is not None else self.tokenizer.decode
            text = self.token_texts[token_id] = decode([token_id], skip_special_tokens=False)
        return text


def _token_texts(tokenizer) -> dict:
    """The tokenizer's cache of single tokens' texts (a cache of this detokenizer's own where no weak reference
    can key the tokenizer)."""
    try:
        return _TOKEN_TEXTS.setdefault(tokenizer, {})
    except TypeError:
        return {}


def _rust_tokenizer(tokenizer):
    """The Rust tokenizer behind a fast Hugging Face one, where its decode (and DecodeStream) gives the text the
    Hugging Face decode would: no clean-up of spaces around punctuation. A tokenizer configured to clean up may
    still do none: transformers skips it for BPE models (Llama 3's config asks for it), which the probe sees."""
    try:
        return _RUST_BEHIND[tokenizer]
    except (KeyError, TypeError):  # not yet worked out, or an object no weak reference can key
        pass
    rust = getattr(tokenizer, "_tokenizer", None)
    if DecodeStream is None or not isinstance(rust, _RustTokenizer):
        rust = None
    elif getattr(tokenizer, "clean_up_tokenization_spaces", False):
        ids = rust.encode(_CLEAN_UP_PROBE, add_special_tokens=False).ids
        if tokenizer.decode(ids) != rust.decode(ids, skip_special_tokens=False):
            rust = None
    try:
        _RUST_BEHIND[tokenizer] = rust
    except TypeError:
        pass
    return rust
