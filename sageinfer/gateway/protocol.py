"""OpenAI request shapes (pydantic) and their mapping onto SamplingParams."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sageinfer.sampling_params import SamplingParams


class _Strict(BaseModel):
    # Types as sent: "10" is no integer, NaN and Infinity are no numbers. Unknown fields are dropped,
    # not kept (a client's extra fields cost no memory beyond the body's size limit).
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


# Fields that OpenAI and vLLM clients send for features this server does not have yet: a request
# that needs one is refused (400) rather than answered as if it had been honoured. Each entry says
# which values ask for nothing (clients often send those by default).
_UNSUPPORTED_FIELDS = {
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "structured_outputs": lambda v: v is None,
    "prompt_logprobs": lambda v: v is None,
    "best_of": lambda v: v is None or v == 1,
}


class _SamplingFields(_Strict):

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Keep only the last k prompt tokens (vLLM's truncate_prompt_tokens).
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    # Accepted only with the values that ask for nothing (see _UNSUPPORTED_FIELDS).
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: dict[str, float] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: Any = None
    best_of: Any = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None, defaults: dict) -> SamplingParams:
        """defaults: the server's values for fields the request leaves out (generation_config)."""
        for name, asks_nothing in _UNSUPPORTED_FIELDS.items():
            if not asks_nothing(getattr(self, name)):
                raise ValueError(f"{name} is not supported by this server yet; leave it out")

        def pick(name: str, neutral):
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, neutral)
        return SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0), max_tokens=max_tokens, min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias or None, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or None)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = None  # OpenAI's default for completions is 16
    logprobs: int | None = None
    echo: bool = False

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        defaults = defaults or {}
        max_tokens = self.max_tokens if self.max_tokens is not None else defaults.get("max_tokens", 16)
        return self._sampling(max_tokens, self.logprobs, defaults)

    def prompts(self) -> list:
        """The prompt field as a list of engine prompts (strings or token-id dicts)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": list(p)}]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) for x in p):
            return [{"prompt_token_ids": list(x)} for x in p]
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists")


class ContentPart(_Strict):
    """An OpenAI content part; this server's models read text only."""
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "ContentPart":
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: the model reads text only")
        if self.text is None:
            raise ValueError("a text content part needs a string 'text'")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        """Without max_tokens a reply may run to the end of the context (or the checkpoint's max_new_tokens)."""
        defaults = defaults or {}
        max_tokens = self.max_completion_tokens or self.max_tokens or defaults.get("max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, defaults)


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
