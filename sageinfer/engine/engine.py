"""The engine: add_request / step / abort over the scheduler, the model runner and the detokenizer."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sageinfer.config import EngineConfig, parse_dtype
from sageinfer.engine.detokenizer import IncrementalDetokenizer
from sageinfer.engine.input_processor import InputProcessor, PromptType, load_tokenizer
from sageinfer.engine.request import Request
from sageinfer.engine.scheduler import Scheduler
from sageinfer.engine.utilization import UtilizationMeter
from sageinfer.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from sageinfer.executor.model_runner import ModelRunner
from sageinfer.executor.workers import TensorParallelWorkers, agree_on_num_blocks
from sageinfer.frozen_heap import freeze_start_up_heap, thaw_heap
from sageinfer.kv_cache.manager import KVCacheManager
from sageinfer.layers.quantization.config import load_quant_config
from sageinfer.models.generation_defaults import load_generation_defaults
from sageinfer.models.model_config import load_model_config
from sageinfer.outputs import CompletionOutput, Logprob, RequestOutput
from sageinfer.platforms import get_platform
from sageinfer.sampling_params import SamplingParams, UnsatisfiableRequest

logger = logging.getLogger(__name__)


@dataclass
class _ParentRequest:
    """A user request: its prompt and its n samples (children)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    arrival_time: float = field(default_factory=time.monotonic)
    error: str | None = None  # set when its own processing failed
    bad_request: bool = False  # ... on UnsatisfiableRequest: the request asked for what cannot be met
    prompt_logprobs: list | None = None  # with prompt_logprobs: an entry per prompt position (None first)
    num_prompt_logprobs: int = 0         # positions filled so far


@dataclass
class _InFlight:
    """A launched step whose sampled tokens have not been read yet."""
    sampled_requests: list[Request]
    sampler_output: object  # layers.sampler.SamplerOutput or None
    token_indices: list[int]  # where each request's placeholder sits in its all_token_ids
    prompt_logprobs: object = None  # executor.prompt_logprobs.PromptLogprobsOutput of this step, if any


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_prompt_tokens_computed: int
    num_generated_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True, attention_backend: str | None = None,
                 output_kind: str = "cumulative"):
        thaw_heap()  # an engine built before this one may be garbage by now: collectable again
        self.config = config
        self.platform = get_platform(config.device)
        self.platform.check_config(config)
        if config.block_size is None:
            config.block_size = self.platform.kv_block_size
        self.model_config = load_model_config(config.model)
        self._check_quantization(config)
        model_max_len = self.model_config.max_model_len
        if self.model_config.sliding_window:  # no sliding-window attention yet: stay inside the window
            model_max_len = min(model_max_len, self.model_config.sliding_window)
        if config.max_model_len is not None and config.max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's limit ({model_max_len})")
        config.finalize(model_max_len)
        torch.manual_seed(config.seed)
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, config.max_model_len,
                                     config.max_logprobs,
                                     load_generation_defaults(config.model, config.generation_config),
                                     config.scheduling_policy)
        dtype = parse_dtype(config.dtype, self.model_config.dtype)
        self.workers = None  # tensor-parallel ranks 1..N-1 (this process is rank 0)
        if config.tensor_parallel_size > 1:
            visible = self.platform.device_count()
            if visible is not None and visible < config.tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size {config.tensor_parallel_size} needs a device per rank; "
                                 f"{visible} {self.platform.name} device(s) visible")
            self.workers = TensorParallelWorkers(config, attention_backend, self.eos_token_ids)
            init_tensor_parallel(0, config.tensor_parallel_size, self.platform.dist_backend, self.workers.init_method)
        started = time.perf_counter()
        try:
            self.runner = ModelRunner(config, self.model_config, self.platform, dtype, attention_backend,
                                      show_progress)
        except BaseException:
            self.shutdown(timeout=2.0)  # the others fail the same way: stop them, raise the reason here
            raise
        self.model_load_seconds = time.perf_counter() - started
        logger.info("model loaded in %.1f s (%s)", self.model_load_seconds,
                    ", ".join(f"{name[:-2]} {seconds:.1f} s" for name, seconds in self.runner.load_phases.items()))
        num_blocks, capacity = self._warm_up_and_size_cache(config)
        if self.workers is not None:
            self.workers.started = True
        logger.info("KV cache: %d blocks of %d tokens = %d tokens", num_blocks, config.block_size, capacity)
        self.num_kv_blocks = num_blocks
        connector = self.offload_mirror = None
        if config.kv_offload_gb > 0:
            from sageinfer.transport.host_offload import HostOffloadConnector
            # kv_offload_gb is the instance's: each rank holds its shard of every block
            host_blocks = int(config.kv_offload_gb * 2**30 // (self.runner.kv_bytes_per_block()
                                                               * config.tensor_parallel_size))
            connector = HostOffloadConnector(self.runner.kv_caches, host_blocks, self.platform)
            if self.workers is not None:
                from sageinfer.executor.offload_mirror import MirroredOffload
                connector = self.offload_mirror = MirroredOffload(connector)  # the other ranks replay its copies
            logger.info("KV offload tier: %d host blocks", host_blocks)
        self.kv_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching, connector)
        self.kv_transfer = None
        if config.kv_transfer_config is not None:
            from sageinfer.transport.kv_transfer_config import build_connector
            from sageinfer.distributed.parallel_state import TensorParallelGroup, kv_head_range
            tp = config.tensor_parallel_size
            heads = [kv_head_range(self.model_config.num_key_value_heads, TensorParallelGroup(rank, tp))
                     for rank in range(tp)]
            self.kv_transfer = build_connector(config.kv_transfer_config, self.runner.kv_caches, config.block_size,
                                              self.platform, tp, heads)
            logger.info("KV transfer: %s as %s (engine %s)", config.kv_transfer_config["kv_connector"],
                        config.kv_transfer_config["kv_role"], config.kv_transfer_config["engine_id"])
        self.kv_events = None
        if config.kv_events_config is not None:
            from sageinfer.transport.kv_events import KVEventPublisher
            self.kv_manager.enable_events()
            try:
                self.kv_events = KVEventPublisher(config.kv_events_config, config.block_size)
            except ValueError:
                self.shutdown()  # the ranks and the transfer connector stop too
                raise
            logger.info("KV events: %s (snapshots: %s)", config.kv_events_config["endpoint"],
                        config.kv_events_config["replay_endpoint"])
        self.scheduler = Scheduler(config, self.kv_manager, self.kv_transfer)
        self.requests: dict[str, _ParentRequest] = {}
        # What step() returns for a request it advanced: "cumulative", its whole output so far;
        # "delta", the tokens (and logprobs) since its last output, the text still whole (the engine
        # core process, which sends differences); "final", only finished requests (an offline batch).
        # Whole outputs at every step cost O(tokens) each: 3 -> 14 ms a step on a CPU for 256
        # sequences as they grew to 950 tokens.
        self.output_kind = output_kind
        self.num_prompt_tokens_computed = 0
        self.num_generated_tokens = 0
        self.async_scheduling = config.async_scheduling
        self._in_flight: _InFlight | None = None
        self.grammars = None  # structured_output.grammar.GrammarCompiler, made for the first request with one
        tp = config.tensor_parallel_size
        rank_weight_bytes = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        self.utilization = UtilizationMeter(self.model_config, rank_weight_bytes * tp,
                                            self.runner.kv_bytes_per_block() / config.block_size * tp, tp,
                                            *self.platform.peak_rates())
        freeze_start_up_heap()  # kept out of the collector's full passes while serving

    def _check_quantization(self, config: EngineConfig) -> None:
        """A checkpoint whose kernels take FP8 values, on a device without FP8 (its kernels would fail to
        compile in the first forward pass): FP8 weights run multiplied out to 16 bits (the model runner
        does it after loading), the rest is refused at start."""
        quant = load_quant_config(config.model, config.quantization)
        if quant is None or not quant.needs_fp8() or self.platform.supports_fp8():
            return
        if not quant.dequantizes_without_fp8():
            raise ValueError(f"the checkpoint's quantization ({quant.describe()}) needs FP8 (e4m3) values, which the "
                             f"{self.platform.name} platform does not have on this device; FP8 and block FP8, INT8 "
                             f"W8A8 and integer weight-only checkpoints (W4A16, W8A16: GPTQ, AWQ, compressed-tensors) "
                             f"run here")
        logger.warning("the %s platform has no FP8 on this device: the checkpoint's FP8 weights (%s) run multiplied "
                       "out to %s, twice their memory", self.platform.name, quant.describe(), config.dtype)

    # ---- requests --------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt)

    def check_sampling_params(self, params: SamplingParams) -> None:
        self.inputs.check_sampling_params(params)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        self.check_sampling_params(params)
        self.inputs.check_priority(priority)
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        self.inputs.check_prompt_length(prompt_ids)
        max_len = self.config.max_model_len
        grammar = self._compile_grammar(params) if params.structured_outputs is not None else None
        remote_kv = self._remote_kv_of(params)
        children, detoks = [], []
        for index in range(params.n):
            child_params = params.clone_for_sample(index) if params.n > 1 else params
            generator = None
            if child_params.seed is not None:
                generator = torch.Generator(device=self.runner.device).manual_seed(child_params.seed)
            child = Request(f"{request_id}-{index}", request_id, index, prompt_ids, child_params,
                            self.eos_token_ids, arrival_time, generator, priority)
            limit = max_len - len(prompt_ids)
            child.max_output_tokens = max(1, min(child_params.max_tokens or limit, limit))
            if grammar is not None:
                child.grammar = self.grammars.matcher(grammar, params.structured_outputs.after_token_id)
            if index > 0:
                child.leader = children[0]  # and shares the prompt's blocks, loaded or computed by the leader
            else:
                child.remote_kv = remote_kv
            children.append(child)
            detoks.append(None if self.tokenizer is None else IncrementalDetokenizer(
                self.tokenizer, prompt_ids, child_params.skip_special_tokens, child_params.stop,
                child_params.include_stop_str_in_output))
        self.requests[request_id] = _ParentRequest(
            request_id, prompt_text, prompt_ids, children, detoks,
            prompt_logprobs=[None] * len(prompt_ids) if params.prompt_logprobs is not None else None)
        for child in children:
            self.scheduler.add_request(child)

    def _remote_kv_of(self, params: SamplingParams) -> dict | None:
        """The prefill instance's kv_transfer_params to load this prompt's KV from, if any; a request
        that asks for a role this instance doesn't have is refused."""
        wanted = params.kv_transfer_params
        if not wanted:
            return None
        if self.kv_transfer is None:
            raise ValueError("kv_transfer_params: this instance was started without --kv-transfer-config")
        if wanted.get("do_remote_decode") and not self.kv_transfer.is_producer:
            raise ValueError("kv_transfer_params: do_remote_decode needs a kv_producer or kv_both instance")
        if not wanted.get("do_remote_prefill"):
            return None
        if not self.kv_transfer.is_consumer:
            raise ValueError("kv_transfer_params: do_remote_prefill needs a kv_consumer or kv_both instance")
        if wanted.get("kv_connector") not in (None, self.kv_transfer.name):
            raise ValueError(f"kv_transfer_params come from a {wanted.get('kv_connector')}; this instance "
                             f"uses {self.kv_transfer.name}")
        # Prompt logprobs need every prompt position computed here.
        return None if params.prompt_logprobs is not None else wanted

    def _compile_grammar(self, params: SamplingParams):
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; the engine runs with skip_tokenizer_init")
        if self.grammars is None:
            from sageinfer.structured_output.grammar import GrammarCompiler
            self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        return self.grammars.compile(params.structured_outputs)

    def add_request_or_error(self, request_id: str, prompt: PromptType, params: SamplingParams,
                             arrival_time: float | None = None, priority: int = 0) -> Exception | None:
        """add_request for the serving loops: a request that can't be added fails alone. Returns why
        (a ValueError is the request's fault), or None."""
        try:
            self.add_request(request_id, prompt, params, arrival_time, priority)
            return None
        except Exception as exc:  # noqa: BLE001
            self.abort_request(request_id)  # whatever part of it was added
            if not isinstance(exc, ValueError):
                logger.exception("request %s could not be added", request_id)
            return exc

    def abort_request(self, request_id: str) -> None:
        parent = self.requests.pop(request_id, None)
        if parent is not None:
            for child in parent.children:
                self.scheduler.finish(child, "abort")

    def _warm_up_and_size_cache(self, config: EngineConfig) -> tuple[int, int]:
        """Start-up after the model's load: the kernel warm-ups, the memory profile and the cache, the
        graphs, the long-prompt warm-up; the cache's blocks and tokens."""
        # The quantized layers' kernels compile in the background from here, beside the attention kernels'
        # variants the runner started while the weights loaded (no collectives: each rank warms its own);
        # the graphs' capture then finds them compiled.
        self.runner.start_kernel_warm_up(attention=False)
        started = time.perf_counter()
        try:
            num_blocks = self.runner.determine_num_blocks()
            if self.workers is not None:
                num_blocks = agree_on_num_blocks(num_blocks, self.runner.device)
            capacity = (num_blocks - 1) * config.block_size
            if capacity < config.max_model_len:
                self.shutdown()
                halves = "; kv_cache_dtype=fp8 or int8 halves a token" if config.kv_cache_dtype == "auto" else ""
                raise ValueError(
                    f"the KV cache holds {max(capacity, 0)} tokens ({num_blocks} blocks of {config.block_size}), "
                    f"fewer than max_model_len ({config.max_model_len}): lower max_model_len or give the cache "
                    f"more memory (gpu_memory_utilization, now {config.gpu_memory_utilization}; "
                    f"kv_cache_memory_bytes{halves})")
            self.runner.allocate_kv_cache(num_blocks)
        except BaseException:
            self.runner.finish_kernel_warm_up(cancel=True)  # no compile left running past a failed start
            raise
        # The memory profile's step runs beside the background compiles: its own kernels compile here. It
        # may wait for them (before it measures the graphs): that wait counts as the warm-up's.
        self.memory_profile_seconds = time.perf_counter() - started - self.runner.kernel_warm_up_wait_seconds
        logger.info("memory profile and KV cache allocation took %.1f s", self.memory_profile_seconds)
        self.runner.finish_kernel_warm_up()
        self.kernel_warm_up_seconds = self.runner.kernel_warm_up_wait_seconds
        if self.kernel_warm_up_seconds:
            logger.info("start-up waited %.1f s for the kernel warm-up (attention, quantized layers)",
                        self.kernel_warm_up_seconds)
        self.graph_capture_seconds = self.runner.capture_graphs()
        self.runner.warm_up_logits()
        warm_up = self.runner.long_prefill_warm_up(num_blocks)
        if warm_up is not None and self.workers is not None:
            self.workers.send_warm_up(*warm_up)  # every rank runs the same steps, with rank 0
        self.long_prompt_warm_up_seconds = self.runner.warm_up_long_prefill(*warm_up) if warm_up is not None else 0.0
        if self.long_prompt_warm_up_seconds:
            logger.info("long-prompt kernels warmed up in %.1f s", self.long_prompt_warm_up_seconds)
        return num_blocks, capacity

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the tensor-parallel workers, if any (they also stop when this process exits), and
        the KV transfer connector."""
        if getattr(self, "kv_transfer", None) is not None:
            self.kv_transfer.close()
            self.kv_transfer = None
        if getattr(self, "kv_events", None) is not None:
            self.kv_events.close()
            self.kv_events = None
        if self.workers is not None:
            self.workers.shutdown(timeout)
            self.workers = None
            if getattr(self, "runner", None) is not None:  # (none when the model failed to build)
                self.runner.release_graphs()
            destroy_tensor_parallel()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix on the device (vLLM's reset_prefix_cache): later prompts are computed
        in full. False, and nothing forgotten, while requests are in flight (their blocks are in use)."""
        if self.requests:
            return False
        self.kv_manager.pool.reset_prefix_cache()
        return True

    def kv_transfer_description(self) -> dict | None:
        """What the KV transfer connector says of itself to a PD proxy; None without one."""
        return None if self.kv_transfer is None else self.kv_transfer.description()

    def has_pending_transfers(self) -> bool:
        """KV still to be sent or loaded (a serving loop keeps stepping to move it along)."""
        return self.scheduler.has_pending_transfers

    # ---- the loop --------------------------------------------------------------------
    # Async scheduling: step N+1 is scheduled and launched before step N's tokens are read, so the
    # host's work hides behind the device's. Tokens of step N are placeholders on the host until
    # then; the runner takes them from the device. A request that turns out to have finished at step
    # N computed one wasted token in step N+1, which is dropped.
    # Bad words and grammars read a request's tokens on the host. When the step in flight holds such a request,
    # the next step's forward is launched all the same; its sampling waits until the step in flight's tokens
    # are read and applied (its masks made meanwhile, while the device runs the forward; tensor-parallel ranks
    # are sent them then).
    def step(self) -> list[RequestOutput]:
        outputs = []
        masks_wait = self._in_flight is not None and any(r.sampling_params.needs_output_tokens
                                                         for r in self._in_flight.sampled_requests)
        sched = self.scheduler.schedule()
        self.kv_manager.flush_transfers()  # offload-tier copies, ordered before this step's forward
        launched = None
        if not sched.is_empty:
            prev = self._in_flight
            prev_tokens = prev.sampler_output.token_ids if prev is not None and prev.sampler_output else None
            if not masks_wait:
                self._fill_grammar_bitmasks(sched.scheduled)
            if self.workers is not None:
                offload = self.offload_mirror.take_ops() if self.offload_mirror is not None else None
                self.workers.send_step(sched.scheduled, use_prev_tokens=prev_tokens is not None, offload=offload,
                                       defer_token_masks=masks_wait)
            result = self.runner.execute(sched.scheduled, prev_tokens, after_layer=self.scheduler.stage_kv(sched),
                                         defer_token_masks=masks_wait)
            host = result.host
            self.utilization.record_step(np.diff(host.query_start_loc), host.seq_lens, len(host.logits_indices))
            self.kv_manager.step_launched()
            self.scheduler.update_after_step(sched)
            self.num_prompt_tokens_computed += sum(
                n for r, n in sched.scheduled if r.num_computed_tokens - n < r.num_prompt_tokens)
            launched = _InFlight(result.sampled_requests, result.sampler_output,
                                 [r.append_placeholder(row) for row, r in enumerate(result.sampled_requests)],
                                 result.prompt_logprobs)
            if masks_wait:  # the step in flight's tokens first (the forward runs meanwhile), then this step's draw
                outputs += self._process(self._take_in_flight())
                self._fill_grammar_bitmasks(sched.scheduled)
                if self.workers is not None:
                    self.workers.send_token_masks(result.sampled_requests)
                launched.sampler_output = self.runner.sample_pending(result)
        elif self.scheduler.has_pending_transfers and self._in_flight is None:
            time.sleep(0.0005)  # only KV transfers to wait for: poll them without spinning a core
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            outputs += self._process(previous)
        if not self.async_scheduling and self._in_flight is not None:
            outputs += self._process(self._take_in_flight())
        if self.kv_events is not None:
            self.kv_events.publish(self.kv_manager.take_events())
        return outputs

    def _fill_grammar_bitmasks(self, scheduled: list) -> None:
        """The allowed tokens of each scheduled request with a grammar, from the tokens it has accepted (a
        request that finished meanwhile keeps its old row: its token is dropped)."""
        if self.grammars is None:  # no request has had a grammar
            return
        bound = []
        for request, _ in scheduled:
            if request.grammar is None or request.is_finished:
                continue
            if request.grammar.waiting_for is None:
                bound.append(request)
            else:  # not bound yet (after_token_id): any token may come
                request.grammar_bitmask = None
        if bound:
            for request, row in zip(bound, self.grammars.next_bitmasks([r.grammar for r in bound])):
                request.grammar_bitmask = row

    def _take_in_flight(self) -> "_InFlight":
        step, self._in_flight = self._in_flight, None
        return step

    def _process(self, step: "_InFlight") -> list[RequestOutput]:
        """Read a launched step's tokens (the one device->host sync) and apply them."""
        if step.prompt_logprobs is not None:
            self._add_prompt_logprobs(step.prompt_logprobs)
        out = step.sampler_output
        if out is None:
            return []
        token_ids, logprobs, lp_ids, ranks = out.to_lists()
        touched: dict[str, _ParentRequest] = {}
        for row, (request, token, index) in enumerate(zip(step.sampled_requests, token_ids, step.token_indices)):
            parent = self.requests.get(request.parent_id)
            if request.is_finished or parent is None:
                continue
            touched[parent.request_id] = parent
            request.resolve_placeholder(index, token)
            self.kv_manager.cache_full_blocks(request)
            self.num_generated_tokens += 1
            # What follows depends on this request alone (its text, stop strings, logprobs): a failure
            # here fails this request, not the engine.
            try:
                detok = parent.detokenizers[request.index]
                if logprobs is not None and request.sampling_params.logprobs is not None:
                    k = request.sampling_params.logprobs
                    request.logprobs.append(_logprob_entry(lp_ids[row][:k + 1], logprobs[row][:k + 1], ranks[row],
                                                           detok))
                    request.cumulative_logprob += logprobs[row][0]
                if request.grammar is not None:
                    request.grammar.accept(token)
                self._check_stop(request, detok, token, index - request.num_prompt_tokens + 1)
                if not request.is_finished and request.grammar is not None and request.grammar.is_terminated:
                    self.scheduler.finish(request, "stop")
                if request.is_finished:
                    request.truncate_after(index)
                    if detok is not None and request.finish_reason != "stop":
                        detok.flush()
            except Exception as exc:  # noqa: BLE001 - reported on the request
                self._fail(parent, exc)
        if self.output_kind == "final":
            return [self._make_output(p) for p in touched.values() if all(c.is_finished for c in p.children)]
        return [self._make_output(p) for p in touched.values()]

    def _add_prompt_logprobs(self, result) -> None:
        """File a step's prompt logprobs by position (a recomputed prompt, after preemption, writes
        the same entries again)."""
        target_lp, ranks, top_lp, top_ids = result.to_lists()
        row = 0
        for request, first, count in result.spans:
            parent = self.requests.get(request.parent_id)
            if parent is not None and request.index == 0 and parent.prompt_logprobs is not None:
                k = request.sampling_params.prompt_logprobs
                detok = parent.detokenizers[0]
                for j in range(count):
                    position = first + j
                    target = parent.prompt_token_ids[position]
                    ids = [target] + (top_ids[row + j][:k] if k else [])
                    values = [target_lp[row + j]] + (top_lp[row + j][:k] if k else [])
                    if parent.prompt_logprobs[position] is None:
                        parent.num_prompt_logprobs += 1
                    parent.prompt_logprobs[position] = _logprob_entry(ids, values, ranks[row + j], detok)
            row += count

    def _fail(self, parent: _ParentRequest, exc: BaseException) -> None:
        """End every sample of a request whose own processing raised; the engine goes on."""
        parent.bad_request = isinstance(exc, UnsatisfiableRequest)
        if parent.bad_request:  # no fault of the engine's
            logger.warning("request %s failed: %s", parent.request_id, exc)
        else:
            logger.exception("request %s failed", parent.request_id, exc_info=exc)
        parent.error = f"{type(exc).__name__}: {exc}"
        for child in parent.children:
            self.scheduler.finish(child, "error")

    def _check_stop(self, request: Request, detok: IncrementalDetokenizer | None, token: int,
                    num_output: int) -> None:
        params = request.sampling_params
        past_min = num_output >= params.min_tokens
        if past_min and not params.ignore_eos and token in request.eos_token_ids:
            return self.scheduler.finish(request, "stop")
        if past_min and token in params.all_stop_token_ids:
            return self.scheduler.finish(request, "stop", token)
        if detok is not None:
            stop_str = detok.add_token(token, check_stop=past_min)
            if stop_str is not None:
                return self.scheduler.finish(request, "stop", stop_str)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len
        if num_output >= max_tokens or request.num_prompt_tokens + num_output >= self.config.max_model_len:
            self.scheduler.finish(request, "length")

    def _make_output(self, parent: _ParentRequest) -> RequestOutput:
        outputs = []
        for child, detok in zip(parent.children, parent.detokenizers):
            wants_logprobs = child.sampling_params.logprobs is not None
            # Tokens still on the device (async scheduling's placeholders) are not output yet.
            visible = child.num_output_tokens - child.num_pending_tokens
            start = child.num_reported_tokens if self.output_kind == "delta" else 0
            child.num_reported_tokens = visible
            outputs.append(CompletionOutput(
                index=child.index, text=detok.text if detok is not None else "",
                token_ids=child.output_token_ids[start:visible],
                cumulative_logprob=child.cumulative_logprob if wants_logprobs else None,
                logprobs=child.logprobs[start:visible] if wants_logprobs else None,
                finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        finished = all(c.is_finished for c in parent.children)
        if finished:
            self.requests.pop(parent.request_id, None)
        first = parent.children[0]
        queue_time = (first.first_scheduled_time - first.arrival_time
                      if first.first_scheduled_time is not None else None)
        complete = parent.prompt_logprobs is not None and parent.num_prompt_logprobs == len(parent.prompt_token_ids) - 1
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outputs, finished,
                             num_cached_tokens=first.num_cached_tokens, queue_time=queue_time, error=parent.error,
                             prompt_logprobs=parent.prompt_logprobs if complete else None,
                             kv_transfer_params=first.kv_transfer_params_out if finished else None,
                             bad_request=parent.bad_request)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_manager.pool.usage(), prefix_cache_hit_rate=self.kv_manager.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_computed=self.num_prompt_tokens_computed,
            num_generated_tokens=self.num_generated_tokens)


def _logprob_entry(ids: list[int], values: list[float], sampled_rank: int,
                   detok: IncrementalDetokenizer | None) -> dict[int, Logprob]:
    """One position's logprobs, built once when its token is read (not again on every step):
    the sampled token first (with its rank), then the top k by rank."""
    entry = {}
    for j, (tid, lp) in enumerate(zip(ids, values)):
        if tid not in entry:
            entry[tid] = Logprob(lp, sampled_rank if j == 0 else j, detok.decode_token(tid) if detok is not None else None)
    return entry

