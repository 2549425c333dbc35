"""Sampling parameters of one request, validated on construction."""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INT_FIELDS = ("n", "top_k", "min_tokens")


class UnsatisfiableRequest(ValueError):
    """Found while the request runs: what its parameters ask together cannot be met (a grammar that no token
    its other limits leave can follow). The request's fault, not the engine's: a server answers 400."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class StructuredOutputsParams:
    """What the output must be, exactly one of: a JSON schema (text or a dict), any JSON object, a
    regular expression, one of a list of strings, or an EBNF grammar (vLLM's StructuredOutputsParams).
    after_token_id: the output runs free until it generates this token, and is held to the spec after it (a
    reasoning model's end of thinking: it thinks, then answers in the format)."""
    json: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    after_token_id: int | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, choice or grammar; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured outputs: json must be a JSON schema, as a string or an object")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError("structured outputs: choice must be a non-empty list of strings")
        if self.after_token_id is not None and not (_is_int(self.after_token_id) and self.after_token_id >= 0):
            raise ValueError("structured outputs: after_token_id must be a token id (an integer >= 0)")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    # Logprobs of each prompt token given the ones before it, with the top k (vLLM's prompt_logprobs).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias, in [-100, 100]).
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled.
    allowed_token_ids: list[int] | None = None
    # Words that must not be generated (vLLM's bad_words): the last token of each is banned wherever
    # the tokens before it were just generated. Tokenized by the engine into bad_words_token_ids.
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # The output follows a grammar (JSON schema, regex, choice, EBNF): tokens outside it are masked.
    structured_outputs: StructuredOutputsParams | None = None
    # Prefill/decode separation (vLLM's kv_transfer_params): {"do_remote_decode": true} on a prefill
    # instance keeps the prompt's KV for a decode instance; the params that prefill returns, given to a
    # decode instance, load that KV instead of computing it.
    kv_transfer_params: dict | None = None
    # Filled by the engine: eos ids of the model, so stop checks need no tokenizer.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(name: str, value, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {value!r}")

        for name in _FLOAT_FIELDS:  # NaN passes every range check below, so refuse it first
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, value, "a finite number")
        for name in _INT_FIELDS:
            if not _is_int(getattr(self, name)):
                raise bad(name, getattr(self, name), "an integer")
        if self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", self.logprobs, "an integer >= 0")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise bad("prompt_logprobs", self.prompt_logprobs, "an integer >= 0")
        # Sample i of n draws with seed + i, which must still be a 64-bit generator seed.
        if self.seed is not None and (not _is_int(self.seed) or not _INT64_MIN <= self.seed <= _INT64_MAX - self.n + 1):
            raise bad("seed", self.seed, f"an integer in [{_INT64_MIN}, {_INT64_MAX - self.n + 1}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "non-empty strings")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise bad("logit_bias", self.logit_bias, "a map of token ids to numbers") from None
            if any(t < 0 or not -100.0 <= v <= 100.0 for t, v in self.logit_bias.items()):
                raise bad("logit_bias", self.logit_bias, "token ids >= 0 with biases in [-100, 100]")
        if self.allowed_token_ids is not None and (
                not self.allowed_token_ids or any(not _is_int(t) or t < 0 for t in self.allowed_token_ids)):
            raise bad("allowed_token_ids", self.allowed_token_ids, "a non-empty list of token ids")
        if self.bad_words is not None and any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise bad("bad_words", self.bad_words, "non-blank strings")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "non-negative integers")
        if self.kv_transfer_params is not None and not isinstance(self.kv_transfer_params, dict):
            raise bad("kv_transfer_params", self.kv_transfer_params, "a JSON object")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_output_tokens(self) -> bool:
        """Whether sampling reads the tokens generated so far on the host (bad words, a grammar): then the
        draw of a step launched before the previous one's tokens are read waits for them (the forward does
        not). (Penalties count them on the device: executor/penalty_state.py.)"""
        return bool(self.bad_words_token_ids) or self.structured_outputs is not None

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def clone_for_sample(self, index: int) -> "SamplingParams":
        """Params of the index-th of n samples: n=1, and a distinct seed if one was given."""
        child = copy.copy(self)
        child.n = 1
        if self.seed is not None:
            child.seed = self.seed + index
        child.stop = list(self.stop)
        child.all_stop_token_ids = set(self.all_stop_token_ids)
        return child
