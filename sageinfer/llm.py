"""The offline API: LLM(model=...).generate(prompts, sampling_params)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from tqdm.auto import tqdm

from sageinfer.config import EngineConfig
from sageinfer.engine.engine import LLMEngine, PromptType
from sageinfer.outputs import RequestOutput
from sageinfer.sampling_params import SamplingParams


class LLM:
    """Offline generation. Keyword arguments are EngineConfig's fields (max_num_seqs, dtype,
    enable_prefix_caching, kv_cache_dtype, ...); attention_backend picks "torch_ref" or "triton"."""

    def __init__(self, model: str, *, attention_backend: str | None = None, show_progress: bool = True,
                 **engine_options):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise ValueError(f"unknown engine options {unknown}; the options are {sorted(known - {'model'})}")
        config = EngineConfig(model=model, **engine_options)
        # generate() returns finished requests only
        self.engine = LLMEngine(config, show_progress=show_progress, attention_backend=attention_backend,
                                output_kind="final")
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (e.g. between timed runs of the same prompts); False while requests
        are in flight."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json values (generation_config="auto");
        what generate() uses when it is given none."""
        return SamplingParams(**self.engine.inputs.sampling_defaults)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to several
        (a list of them), rendered with the tokenizer's chat template or the one given; `tools`
        (OpenAI function definitions) go to the template, which shows them to the model, and
        chat_template_kwargs are more of its variables (e.g. {"enable_thinking": False}); with
        continue_final_message (and add_generation_prompt=False) the reply continues the last, assistant message."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conversation in conversations:
            text, ids = self.engine.inputs.render_chat(conversation, add_generation_prompt, chat_template, tools,
                                                       chat_template_kwargs, continue_final_message)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """priority: one per prompt, with scheduling_policy="priority" (lower values run first)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        for value in priorities:
            self.engine.inputs.check_priority(value)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        # Validate every prompt and its params before any runs, so one bad one doesn't leave others queued.
        for params in params_list:
            self.engine.check_sampling_params(params)
        for prompt in prompts:
            _, ids = self.engine.tokenize_prompt(prompt)
            if not ids or len(ids) > self.engine.config.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens: it must have 1 to max_model_len "
                                 f"({self.engine.config.max_model_len}) tokens")
        # Requests left by an interrupted earlier call are no one's anymore: abort them.
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
        order = {}
        for prompt, params, value in zip(prompts, params_list, priorities):
            request_id = str(next(self._ids))
            order[request_id] = len(order)
            self.engine.add_request(request_id, prompt, params, priority=value)
        # A request whose own processing failed comes back finished, with finish_reason "error" and
        # output.error saying why; the others are unaffected.
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        bar.update(1)
        return results
