"""OpenAI request shapes (pydantic) and their mapping onto SamplingParams."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sageinfer.sampling_params import SamplingParams, StructuredOutputsParams


class _Strict(BaseModel):
    # Types as sent: "10" is no integer, NaN and Infinity are no numbers. Unknown fields are dropped,
    # not kept (a client's extra fields cost no memory beyond the body's size limit).
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # the usage so far in every chunk (vLLM's)


# Fields that OpenAI and vLLM clients send for features this server does not have yet: a request
# that needs one is refused (400) rather than answered as if it had been honoured. Each entry says
# which values ask for nothing (clients often send those by default).
_UNSUPPORTED_FIELDS = {
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
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
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and structured_outputs.
    response_format: Any = None
    # Accepted only with the values that ask for nothing (see _UNSUPPORTED_FIELDS).
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
    prompt_logprobs: int | None = Field(default=None, ge=0)
    best_of: Any = None
    # With --scheduling-policy priority: lower values are served first (vLLM's field).
    priority: int = 0
    # Prefill/decode separation (vLLM's field): set by a PD proxy, passed through to the engine.
    kv_transfer_params: dict[str, Any] | None = None

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
            bad_words=self.bad_words or None, structured_outputs=self._structured_outputs(),
            prompt_logprobs=self._prompt_logprobs(logprobs), kv_transfer_params=self.kv_transfer_params)

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        return self.prompt_logprobs

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The one grammar the request asks for, from whichever field it uses."""
        asked = {}
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind == "json_schema":
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
                asked["response_format"] = {"json": schema}
            elif kind == "json_object":
                asked["response_format"] = {"json_object": True}
            elif kind != "text":
                raise ValueError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                asked[name] = {key: getattr(self, name)}
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, dict):
                raise ValueError("structured_outputs must be an object such as {'json': {...}} or {'regex': '...'}")
            asked["structured_outputs"] = {k: v for k, v in self.structured_outputs.items() if v is not None}
        if len(asked) > 1:
            raise ValueError(f"ask for one structured output, not several: {', '.join(asked)}")
        if not asked:
            return None
        (name, fields), = asked.items()
        try:
            return StructuredOutputsParams(**fields)
        except TypeError:
            raise ValueError(f"{name}: unknown fields {sorted(fields)}; use json, json_object, regex, choice "
                             "or grammar") from None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = None  # OpenAI's default for completions is 16
    logprobs: int | None = None
    echo: bool = False

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        defaults = defaults or {}
        max_tokens = self.max_tokens if self.max_tokens is not None else defaults.get("max_tokens", 16)
        return self._sampling(max_tokens, self.logprobs, defaults)

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        # echo with logprobs lists the prompt's tokens too (how evaluation harnesses score a text)
        if self.echo and logprobs is not None:
            return max(logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

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


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class MessageToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None                 # a tool's answer to one of them
    reasoning_content: str | None = None            # an assistant's earlier thinking (templates may show it)
    reasoning: str | None = None                    # the same, by vLLM's newer name

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """As chat templates read it: tool call arguments as objects (templates write them with tojson)."""
        message = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        thinking = self.reasoning_content if self.reasoning_content is not None else self.reasoning
        if thinking is not None:
            message["reasoning_content"] = thinking  # the name Qwen3's and DeepSeek-R1's templates read
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        return message


def _json_or_text(text: str):
    import json
    try:
        return json.loads(text)
    except ValueError:
        return text


class ToolFunction(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: ToolFunction


class NamedToolChoiceFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message, as written
    tools: list[Tool] | None = None
    # OpenAI's default: "auto" when tools are given, else "none"
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True          # false: at most one call a reply
    chat_template_kwargs: dict | None = None  # more variables for the template, e.g. {"enable_thinking": false}
    include_reasoning: bool = True            # with --reasoning-parser: send the thinking, or leave it out

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def tool_schemas(self) -> list[dict] | None:
        """The tools as chat templates take them."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """tool_choice "required" or a named function: the output is the call(s), held to their schema."""
        choice = self.effective_tool_choice
        if choice in ("none", "auto"):
            return super()._structured_outputs()
        if not self.tools:
            raise ValueError("tool_choice needs tools")
        if super()._structured_outputs() is not None:
            raise ValueError("tool_choice 'required' or a named function cannot be combined with response_format "
                             "or guided decoding")
        by_name = {t.function.name: t.function for t in self.tools}
        if isinstance(choice, NamedToolChoice):
            function = by_name.get(choice.function.name)
            if function is None:
                raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
            return StructuredOutputsParams(json=function.parameters or {"type": "object"})
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"enum": [f.name]}, "parameters": f.parameters or {"type": "object"}}}
                 for f in by_name.values()]
        bounds = {"minItems": 1} if self.parallel_tool_calls else {"minItems": 1, "maxItems": 1}
        return StructuredOutputsParams(json={"type": "array", **bounds, "items": {"anyOf": calls}})

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
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]
