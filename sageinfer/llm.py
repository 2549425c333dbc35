"""The offline API: LLM(model=...).generate(prompts, sampling_params)."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm.auto import tqdm

from sageinfer.config import EngineConfig
from sageinfer.engine.engine import LLMEngine, PromptType
from sageinfer.outputs import RequestOutput
from sageinfer.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, block_size: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 skip_tokenizer_init: bool = False, load_format: str = "auto", trust_remote_code: bool = False,
                 num_gpu_blocks_override: int | None = None, kv_cache_memory_bytes: int | None = None,
                 device: str | None = None, enforce_eager: bool = False, attention_backend: str | None = None,
                 async_scheduling: bool = True, kv_cache_dtype: str = "auto", kv_offload_gb: float = 0.0,
                 admission_lookahead_tokens: int = 256, max_logprobs: int = 20, show_progress: bool = True):
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, skip_tokenizer_init=skip_tokenizer_init,
            load_format=load_format, trust_remote_code=trust_remote_code,
            num_gpu_blocks_override=num_gpu_blocks_override, kv_cache_memory_bytes=kv_cache_memory_bytes,
            device=device, enforce_eager=enforce_eager, async_scheduling=async_scheduling,
            kv_cache_dtype=kv_cache_dtype, kv_offload_gb=kv_offload_gb,
            admission_lookahead_tokens=admission_lookahead_tokens, max_logprobs=max_logprobs)
        self.engine = LLMEngine(config, show_progress=show_progress, attention_backend=attention_backend)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
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
        for prompt, params in zip(prompts, params_list):
            request_id = str(next(self._ids))
            order[request_id] = len(order)
            self.engine.add_request(request_id, prompt, params)
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
