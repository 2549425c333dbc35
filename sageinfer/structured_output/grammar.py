"""Grammars for structured output, on xgrammar: compiled once per spec (cached), a matcher per
sample that follows its tokens and says, before each draw, which tokens may come next.

The engine fills one bitmask row (a bit per token of the model's vocabulary, packed in int32) per
grammar-bound request that samples in a step; the sampler masks the logits on the device, so
requests with and without a grammar share the step.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from sageinfer.sampling_params import StructuredOutputsParams, UnsatisfiableRequest


# A step's bitmasks are filled by xgrammar's threads from this many grammar rows (256 JSON-mode rows of a
# 151,936-token vocabulary: 16.1 ms a step in one thread, 9.8 in two, on a 2-core CPU; benchmarks/grammar_fill.py);
# fewer rows fill in the engine's thread, where starting threads costs more than it saves.
THREADED_FILL_MIN_ROWS = 32
# Half the CPUs this process may run on (at most 8): the rest stay with the engine's loop and the other processes.
FILL_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) // 2 if hasattr(os, "sched_getaffinity")
                          else (os.cpu_count() or 2) // 2))


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=True)
        self._fill_alone = xgr.BatchGrammarMatcher(max_threads=1)
        self._fill_threaded = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar; ValueError (the request's fault) for a spec that can't be compiled."""
        try:
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
                # Fixed separators: free whitespace lets a weak model loop on blanks until max_tokens.
                return self._compiler.compile_json_schema(schema, any_whitespace=False)
            # An object, as OpenAI's json_object mode promises (xgrammar's built-in JSON grammar takes any value).
            if spec.json_object:
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.regex is not None:
                return self._compiler.compile_regex(spec.regex)
            if spec.choice is not None:
                return self._compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
            return self._compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            kind = next(n for n in ("json", "regex", "choice", "grammar") if getattr(spec, n) is not None) \
                if not spec.json_object else "json_object"
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip()  # xgrammar's time and source line
            raise ValueError(f"structured outputs: the {kind} could not be compiled: {reason}") from None

    def matcher(self, compiled, after_token_id: int | None = None) -> "RequestGrammar":
        return RequestGrammar(self._xgr, compiled, after_token_id)

    def next_bitmasks(self, grammars: list["RequestGrammar"]) -> np.ndarray:
        """[len(grammars), width] int32: bit t of row i set where token t may follow grammars[i]'s tokens, the
        rows filled in one call (by several threads from THREADED_FILL_MIN_ROWS rows on)."""
        masks = self._xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        fill = self._fill_threaded if len(grammars) >= THREADED_FILL_MIN_ROWS else self._fill_alone
        fill.batch_fill_next_token_bitmask([g._matcher for g in grammars], masks)
        return masks.numpy()


class RequestGrammar:
    """One sample's position in its grammar; with after_token_id, free (waiting) until it generates that token."""

    def __init__(self, xgr, compiled, after_token_id: int | None = None):
        self._matcher = xgr.GrammarMatcher(compiled)  # its bitmasks: GrammarCompiler.next_bitmasks
        self.waiting_for = after_token_id

    def accept(self, token: int) -> None:
        if self.waiting_for is not None:
            if token == self.waiting_for:
                self.waiting_for = None
            return
        if not self._matcher.accept_token(token):
            # The sampler draws only tokens the grammar allows, unless the request's other limits left none of them
            raise UnsatisfiableRequest(
                f"structured outputs: token {token} does not follow the grammar: no token it allows was left by the "
                "request's other limits (allowed_token_ids, min_tokens, bad_words)")

    @property
    def is_terminated(self) -> bool:
        return self.waiting_for is None and self._matcher.is_terminated()
