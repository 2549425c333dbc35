"""What a request brings, checked and tokenized before it reaches the scheduler.

Used by the engine itself and by a front end in another process, which holds the tokenizer and the
limits but no model.
"""
from __future__ import annotations

import re

from sageinfer.sampling_params import SamplingParams

PromptType = str | dict
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, name: str) -> None:
    """Text a tokenizer can encode. A Python string may hold a lone UTF-16 surrogate (JSON's "\\ud800" decodes to
    one), which is no Unicode character: the tokenizer would fail with a TypeError, here a ValueError names it."""
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(f"{name} holds a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}, "
                         "which is not valid Unicode text")


# apply_chat_template's own arguments, and the names it gives the template itself: a request's template
# variables may not take them.
_TEMPLATE_RESERVED = {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                      "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"}


class TemplateKwargsError(ValueError):
    """chat_template_kwargs is not an object of template variables (the server names that field)."""


def _check_template_kwargs(kwargs) -> None:
    """TemplateKwargsError unless kwargs is an object of template variables."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise TemplateKwargsError("chat_template_kwargs must be an object of template variables")
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise TemplateKwargsError(f"chat_template_kwargs: {key!r} is not a template variable's name")
        if key in _TEMPLATE_RESERVED:
            raise TemplateKwargsError(
                f"chat_template_kwargs: {key!r} is set by the request itself, not a template variable")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {path!r} ({exc}); "
                         "pass skip_tokenizer_init=True to run on token ids") from exc


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_logprobs: int,
                 sampling_defaults: dict | None = None, scheduling_policy: str = "fcfs"):
        self.tokenizer = tokenizer
        self.scheduling_policy = scheduling_policy
        # Sampling values for requests that give none (from the checkpoint's generation_config.json).
        self.sampling_defaults = sampling_defaults or {}
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs

    def check_priority(self, priority) -> None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(f"priority {priority}: requests have priorities only under the priority scheduling "
                             "policy (start with --scheduling-policy priority)")

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass {'prompt_token_ids': [...]} "
                                 "when skip_tokenizer_init=True")
            return prompt, self.encode(prompt, "prompt")
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids has ids outside [0, {self.vocab_size}): {bad[:5]}")
            return prompt.get("prompt"), list(ids)
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def encode(self, text: str, name: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of a request's text (name: its field, for the error of text no tokenizer takes)."""
        check_text(text, name)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None, tools: list[dict] | None = None,
                    template_kwargs: dict | None = None, continue_final_message: bool = False) -> tuple[str, list[int]]:
        """A conversation through the chat template: (text, token ids). ValueError if it can't be.
        template_kwargs: more variables for the template (chat_template_kwargs, e.g. enable_thinking);
        continue_final_message: the prompt ends inside the last (assistant) message, which the reply continues."""
        _check_template_kwargs(template_kwargs)
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if continue_final_message and (not messages or messages[-1].get("role") != "assistant"):
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; the engine runs with skip_tokenizer_init")
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model has no chat template; pass one (--chat-template FILE, or chat_template=...)")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                      add_generation_prompt=add_generation_prompt, tools=tools,
                                                      continue_final_message=continue_final_message,
                                                      **(template_kwargs or {}))
        except Exception as exc:  # a template error is the conversation's fault (e.g. roles out of order)
            raise ValueError(f"the chat template could not render these messages: {exc}") from exc
        check_text(text, "messages")
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_prompt_length(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) > self.max_model_len:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, more than max_model_len "
                             f"({self.max_model_len})")

    def check_sampling_params(self, params: SamplingParams) -> None:
        """Limits that depend on the engine and the model, beyond SamplingParams' own checks: texts a tokenizer and
        the wire take (check_text); also tokenizes bad_words (each as written and after a space, as it reads inside
        a text)."""
        for text in params.stop:
            check_text(text, "stop")
        spec = params.structured_outputs
        if spec is not None:
            for text in (spec.json if isinstance(spec.json, str) else None, spec.regex, spec.grammar,
                         *(spec.choice or [])):
                if text is not None:
                    check_text(text, "structured outputs")
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer; the engine runs with skip_tokenizer_init")
            variants = {tuple(self.encode(text, "bad_words", add_special_tokens=False))
                        for word in params.bad_words for text in (word, " " + word.lstrip())}
            params.bad_words_token_ids = sorted(list(v) for v in variants if v)
        for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or [])):
            if any(t >= self.vocab_size for t in ids):
                raise ValueError(f"{name} has token ids outside [0, {self.vocab_size})")
        after = params.structured_outputs.after_token_id if params.structured_outputs is not None else None
        if after is not None and after >= self.vocab_size:
            raise ValueError(f"structured outputs: after_token_id {after} is outside [0, {self.vocab_size})")
        limit = min(self.max_logprobs, self.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be at most {limit} (max_logprobs {self.max_logprobs}, "
                                 f"vocabulary {self.vocab_size}), got {value}")
