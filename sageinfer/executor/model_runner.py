"""Tensors in, tokens out: builds the flat batch, runs the model, samples on the device."""
from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from sageinfer.attention.backend import AttentionMetadata, LayerKVCache, get_attention_backend, new_kv_scales
from sageinfer.config import EngineConfig
from sageinfer.distributed.parallel_state import get_tp_group, kv_head_range
from sageinfer.executor import graph_memory, prompt_logprobs
from sageinfer.executor.graph_runner import graph_batch_sizes
from sageinfer.executor.penalty_state import PenaltyState
from sageinfer.executor.prompt_logprobs import PromptLogprobsOutput
from sageinfer.executor.sampling_inputs import add_token_masks, build_sampling_batch
from sageinfer.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from sageinfer.models.loader import load_model
from sageinfer.models.model_config import ModelConfig
from sageinfer.platforms.base import Platform
from sageinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# Compile at start-up the attention-kernel variants a step can reach outside the graphs (a first
# request must not pay a kernel's compilation); SAGEINFER_DECODE_WARM_UP=0 skips it.
DECODE_WARM_UP = os.environ.get("SAGEINFER_DECODE_WARM_UP", "1") != "0"
# ... the prefill-attention kernels' variants with them (SAGEINFER_PREFILL_WARM_UP=0: at first launch, as
# in the memory profile and the long-prompt warm-up before).
PREFILL_WARM_UP = os.environ.get("SAGEINFER_PREFILL_WARM_UP", "1") != "0"
# ... and the quantized layers' own kernels for small batches (executor/linear_warm_up.py;
# SAGEINFER_LINEAR_WARM_UP=0: at first launch, in the graphs' capture).
LINEAR_WARM_UP = os.environ.get("SAGEINFER_LINEAR_WARM_UP", "1") != "0"


@dataclass
class StepResult:
    sampled_requests: list           # requests that produced a token this step
    sampler_output: SamplerOutput | None
    prompt_logprobs: PromptLogprobsOutput | None = None
    host: HostInputs | None = None  # the step's shapes (for the engine's utilisation gauges)
    # (logits, sampling batch) of a step whose sampling waits for its token masks (sample_pending draws it)
    pending: tuple | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, platform: Platform,
                 dtype: torch.dtype, attention_backend: str | None = None, show_progress: bool = True):
        started = time.perf_counter()
        self.config = config
        self.model_config = model_config
        self.platform = platform
        # A tensor-parallel rank's own device (rank k on device k of the host).
        # "cuda:1" names the device of a single-rank engine; tensor-parallel ranks take their own
        tp = get_tp_group()
        named = config.device.split(":")[1] if config.device and ":" in config.device and tp.size == 1 else None
        self.device = platform.device(int(named) if named is not None else tp.rank)
        self.dtype = dtype
        self.block_size = config.block_size
        # KV heads this rank holds (all of them without tensor parallelism): the cache's shape and size.
        self.num_kv_heads = kv_head_range(model_config.num_key_value_heads)[1]
        self.backend = get_attention_backend(attention_backend or self._default_backend(), platform)
        self._finish_kernel_warm_up = None  # start_kernel_warm_up's, until finish_kernel_warm_up
        self.kernel_warm_up_wait_seconds = 0.0  # start-up's waits for the background warm-up, all of them
        self.model = None
        # Seconds of the model load's phases (the engine logs them; start-up's benchmark records them): the
        # backend's setup, building the layers, filling their weights, converting them (device work included).
        self.load_phases: dict[str, float] = {"backend_s": time.perf_counter() - started}
        marks = [time.perf_counter()]

        def phase(name: str) -> None:
            platform.synchronize()
            marks.append(time.perf_counter())
            self.load_phases[f"{name}_s"] = marks[-1] - marks[-2]
        try:
            with platform.loading_allocations():
                self.model = load_model(model_config, config.model, config.load_format, dtype, self.device,
                                        self.backend, seed=config.seed, show_progress=show_progress,
                                        quantization=config.quantization, on_built=self._warm_up_while_loading,
                                        phases=phase)
        except BaseException:
            self.finish_kernel_warm_up(cancel=True)  # no compile left running past a failed load
            raise
        use_triton = self.backend.name == "triton"
        for module in self.model.modules():
            if hasattr(module, "use_triton"):
                module.use_triton = use_triton
            if hasattr(module, "platform"):
                module.platform = platform
                quant = getattr(module, "quant", None)
                if quant is not None and quant.config.needs_fp8() and not platform.supports_fp8():
                    # FP8 weights on a device without FP8 (the engine refused the schemes that cannot)
                    module.drop_quantization(quant.dequantized_weight(module).to(dtype))
                elif hasattr(quant, "prepare"):
                    module.quant.prepare(module)  # (the platform's choices, made before any graph)
        self.sampler = Sampler(threshold_kernel=use_triton)
        self.penalties = PenaltyState(model_config.vocab_size, self.device, platform.to_device)
        # The LM head's row counts (_logit_rows): the decode graphs' ladder of batch sizes, uncapped, to the first
        # that holds max_num_seqs.
        self.logit_row_counts = graph_batch_sizes(config.max_num_seqs, max_graph_batch=None)
        self.kv_caches: list[LayerKVCache] = []
        self.graphs = None  # executor.graph_runner.DecodeGraphs once captured
        self.prefill_graphs = None  # executor.graph_runner.PrefillGraphs once captured
        self.graph_memory: graph_memory.GraphMemory | None = None  # the memory profile's estimate for them
        self.graph_memory_bytes = 0  # what their capture took from the device

    def _default_backend(self) -> str:
        name = self.platform.preferred_attention_backend
        if name == "triton":
            try:
                import sageinfer.attention.triton_backend  # noqa: F401
            except ImportError:
                return "torch_ref"
        return name

    # ---- KV cache ------------------------------------------------------------------------
    def kv_store_dtype(self) -> torch.dtype:
        return {"auto": self.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[self.config.kv_cache_dtype]

    def kv_bytes_per_block(self) -> int:
        m = self.model_config
        elem = torch.tensor([], dtype=self.kv_store_dtype()).element_size()
        scale_bytes = 4 if self.config.kv_cache_dtype == "int8" else 0  # one fp32 scale per token and head
        return 2 * m.num_hidden_layers * self.block_size * self.num_kv_heads * (m.head_dim * elem + scale_bytes)

    def determine_num_blocks(self) -> int:
        c = self.config
        if c.num_gpu_blocks_override is not None:
            return c.num_gpu_blocks_override
        budget = c.kv_cache_memory_bytes or self.platform.default_kv_cache_bytes()
        if budget is None:
            budget = self._profile_free_memory()
        return max(int(budget // self.kv_bytes_per_block()), 0)

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Run the largest batch once; what is left under the utilisation cap holds the KV cache."""
        self.platform.synchronize()
        self.platform.empty_cache()
        self.platform.reset_peak_memory()
        baseline = self.platform.memory_allocated()
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_model_len * self.config.max_num_seqs)
        # Sequences of up to 2048 tokens, each with its own blocks of a throw-away cache.
        seq_len = min(num_tokens, 2048, self.config.max_model_len)
        seq_lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(1 + blocks_per_seq * len(seq_lens))
        dummy_kv_bytes = self.platform.memory_allocated() - baseline
        scheduled = [(_ProfileSequence(n, list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))), n)
                     for i, n in enumerate(seq_lens)]
        self.execute(scheduled)
        # The LM head at its largest row count (a full decode batch's logits, which warm_up_logits also makes),
        # and the sampler over a full batch with every option that takes memory: the profiled step samples
        # one greedy row a sequence.
        logits = self.model.compute_logits(torch.zeros(self.logit_row_counts[-1], self.model_config.hidden_size,
                                                       dtype=self.dtype, device=self.device))
        self.sampler(logits[:self.config.max_num_seqs], self._costliest_sampling(self.config.max_num_seqs))
        del logits
        self.penalties.release()  # its slots for a full batch of penalty requests were part of the peak
        self.platform.synchronize()
        peak = self.platform.peak_memory_allocated() - dummy_kv_bytes
        graphs = self._measure_graph_memory()
        self.kv_caches = []
        self.platform.empty_cache()
        free, total = self.platform.mem_get_info()
        # gpu_memory_utilization is this instance's share (as in vLLM): another instance on the same
        # device (a prefill beside a decode) does not shrink it, but no budget exceeds what is free.
        # The graphs, captured after the cache, take their part of either (what their measurement left
        # taken is already out of what is free).
        kept = self.graph_memory.kept_bytes if graphs else 0
        budget = min(total * self.config.gpu_memory_utilization - peak - graphs, free - 0.02 * total - (graphs - kept))
        logger.info("memory profile: peak %.2f GiB of %.2f GiB (%.2f GiB free), graphs %.2f GiB, KV budget %.2f GiB",
                    peak / 2**30, total / 2**30, free / 2**30, graphs / 2**30, budget / 2**30)
        if graphs:
            share = graphs / total
            logger.info("the graphs' %.2f GiB are held back from the KV cache (measured on %d of their %d: %.2f GiB, "
                        "%.1f MiB a graph more): gpu_memory_utilization %.3f gives the cache what %.3f gave without "
                        "it (SAGEINFER_GRAPH_MEMORY_ESTIMATE=0)", graphs / 2**30, self.graph_memory.captured,
                        self.graph_memory.graphs, self.graph_memory.measured_bytes / 2**30,
                        self.graph_memory.per_graph_bytes / 2**20, self.config.gpu_memory_utilization + share,
                        self.config.gpu_memory_utilization)
        return max(int(budget), 0)

    def _measure_graph_memory(self) -> int:
        """The bytes the graphs will hold (executor/graph_memory.py), measured on the memory profile's
        throw-away cache once the background compiles are done: a capture must not meet their launches."""
        if not self._captures_graphs() or not graph_memory.GRAPH_MEMORY_ESTIMATE:
            return 0
        self.finish_kernel_warm_up()
        self.graph_memory = graph_memory.measure(self.platform, self._graph_ladders)
        return self.graph_memory.bytes

    def _costliest_sampling(self, rows: int) -> SamplingBatch:
        """The sampling batch of `rows` requests whose options each take [rows, vocab] buffers: penalties (through
        the penalties' slots, which it fills), allowed tokens, a grammar's bitmask, temperature with top-p and min-p
        but no top-k (a draw over the whole vocabulary: the threshold kernel, which this first launch compiles, or a
        sort where the platform does not run it; a small top-k draws among its tokens alone) and max_logprobs
        (vLLM's memory profile samples a full batch so too)."""
        vocab = self.model_config.vocab_size
        params = SamplingParams(temperature=0.7, top_k=0, top_p=0.9, min_p=0.05, presence_penalty=0.5,
                                frequency_penalty=0.5, repetition_penalty=1.1, logprobs=self.config.max_logprobs,
                                allowed_token_ids=[0])
        requests = [_ProfileSequence(1, [], request_id=f"profile-{i}", sampling_params=params) for i in range(rows)]
        for request in requests:
            request.grammar_bitmask = np.full(-(-vocab // 32), -1, dtype=np.int32)
        return build_sampling_batch(requests, vocab, self.device, self.platform.to_device, self.penalties)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = [self._layer_cache(num_blocks, i) for i in range(self.model_config.num_hidden_layers)]

    def _layer_cache(self, num_blocks: int, layer: int = 0) -> LayerKVCache:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.model_config.head_dim)
        mode, store = self.config.kv_cache_dtype, self.kv_store_dtype()
        scales = (lambda: new_kv_scales(num_blocks, self.block_size, self.num_kv_heads, self.device)) \
            if mode == "int8" else (lambda: None)
        fp8_scale = self.model.fp8_kv_scale(layer) if mode == "fp8" else 1.0
        return LayerKVCache(torch.zeros(shape, dtype=store, device=self.device),
                            torch.zeros(shape, dtype=store, device=self.device), mode, scales(), scales(),
                            fp8_scale=fp8_scale)

    def release_graphs(self) -> None:
        """Drop the captured graphs. They hold the collectives' communicator: it can only be
        destroyed (an engine's shutdown at tp > 1) once no graph refers to it."""
        import gc
        self.graphs = self.prefill_graphs = None
        gc.unfreeze()  # start-up's objects, the graphs among them, were frozen out of the collector's passes
        gc.collect()
        self.platform.synchronize()

    def long_prefill_warm_up(self, num_blocks: int) -> tuple[int, int] | None:
        """The steps of a long prompt to run once before serving, so that the first user to send one
        pays no kernel compilation (from LONG_CONTEXT tokens attention takes other tiles, and the
        platform's long-prompt kernel where it has one): a chunk of new tokens, then a chunk of
        another length after it as context (integer arguments compile apart by divisibility). None
        where there is nothing to warm (other backends, a short max_model_len). Rank 0 decides; the
        other ranks run what it sends (their steps' collectives must pair with its)."""
        from sageinfer.ops.paged_attention import LONG_CONTEXT
        total = min(self.config.max_model_len, 2 * self.config.max_num_batched_tokens)
        if self.backend.name != "triton" or total < LONG_CONTEXT or -(-total // self.block_size) > num_blocks - 1:
            return None
        first = min(self.config.max_num_batched_tokens, total)
        rest = total - first
        if rest and rest % 16 == 0:
            rest -= 1  # the second chunk's lengths are not multiples of 16, the first chunk's (usually) are
        return first, rest

    @torch.inference_mode()
    def warm_up_long_prefill(self, first: int, rest: int) -> float:
        """Run the warm-up's chunks (long_prefill_warm_up); the seconds spent. The blocks written hold
        nothing a request reads: they are free and carry no prefix-cache key."""
        start = time.perf_counter()
        blocks = list(range(1, 1 + -(-(first + rest) // self.block_size)))
        self.execute([(_ProfileSequence(first, blocks[:-(-first // self.block_size)]), first)])
        if rest:
            self.execute([(_ProfileSequence(first + rest, blocks, num_computed_tokens=first), rest)])
        self.platform.synchronize()
        return time.perf_counter() - start

    def _warm_up_while_loading(self, model: torch.nn.Module) -> None:
        """The attention kernels' variants compile while the weights load: they need the layers' shapes,
        not their values (from an empty Triton cache on an H200 the memory profile after the load waited
        for them, 9.5-10.7 s against 1.0 s from a full cache)."""
        self.model = model
        self.start_kernel_warm_up(linear=False)

    def start_kernel_warm_up(self, attention: bool = True, linear: bool = True) -> None:
        """Start compiling, in the background and from several threads, the decode-attention launches
        of the graphs capture_graphs will capture and those a step can choose outside them, and the
        prefill-attention kernels' variants (attention/kernel_warm_up.py), on a one-block cache of the
        cache's layout (attention: the runner starts these while the weights load), and the quantized
        layers' kernels for small batches (executor/linear_warm_up.py; linear: once the weights are loaded
        and converted). The memory profile and the cache allocation go on meanwhile. Not where the platform
        does not compile Triton kernels (the CPU interprets them), with other backends, or with
        SAGEINFER_DECODE_WARM_UP=0."""
        if self.backend.name != "triton" or not self.platform.supports_triton or not DECODE_WARM_UP:
            return
        from sageinfer.attention.kernel_warm_up import decode_plans, graph_plans, prefill_plans, start_in_background
        from sageinfer.background_warm_up import finish_all
        from sageinfer.executor.graph_runner import DEPENDENT_LAUNCH_MAX_DECODE_BATCH
        from sageinfer.executor.linear_warm_up import linear_warm_up_calls, one_row_warm_up_calls, start_linear_warm_up
        from sageinfer.layers.attention import Attention
        finishes = []
        try:
            sizes = graph_batch_sizes(self.config.max_num_seqs, self.config.max_graph_batch_size) \
                if self._captures_graphs() else []
            index = self.device.index
            enter_thread = (lambda: self.platform.set_device(index)) if index is not None else (lambda: None)
            threads = min(8, os.cpu_count() or 1)
            if linear and LINEAR_WARM_UP:
                calls = linear_warm_up_calls(self.model, self.dtype, self.device) + \
                    one_row_warm_up_calls(self.model, self.dtype, self.device)
                if calls:
                    finishes.append(start_linear_warm_up(calls, threads, enter_thread))
            if attention:
                plans = decode_plans(self.backend, self.config.max_num_seqs, self.config.max_model_len,
                                     self.num_kv_heads, eager_decode_from=sizes[-1] + 1 if sizes else 1)
                dependent_max = DEPENDENT_LAUNCH_MAX_DECODE_BATCH if self.platform.supports_dependent_launch() else 0
                plans |= graph_plans(self.backend, sizes, self.config.max_model_len, self.num_kv_heads, dependent_max)
                if PREFILL_WARM_UP:
                    plans |= prefill_plans(self.config.max_model_len, self.block_size,
                                           self.config.max_num_batched_tokens)
                layer = next(m for m in self.model.modules() if isinstance(m, Attention))
                finishes.append(start_in_background(self.backend, layer, self._layer_cache(1), plans, self.device,
                                                    self.dtype, threads=threads, enter_thread=enter_thread))
        except Exception:  # a warm-up is an optimisation: serve anyway, compiling on first use as before
            logger.warning("kernel warm-up failed; its kernels compile on first use", exc_info=True)
        if finishes:
            if self._finish_kernel_warm_up is not None:  # the attention kernels', started while loading
                finishes.insert(0, self._finish_kernel_warm_up)
            self._finish_kernel_warm_up = functools.partial(finish_all, finishes)

    def finish_kernel_warm_up(self, cancel: bool = False) -> float:
        """Wait for start_kernel_warm_up's compiles (before a graph capture, which launches them); the
        seconds start-up waited in this call (kernel_warm_up_wait_seconds sums them). cancel: a start-up
        that failed: wait only for the launches under way."""
        finish, self._finish_kernel_warm_up = self._finish_kernel_warm_up, None
        if finish is None:
            return 0.0
        start = time.perf_counter()
        try:
            finish(cancel)
            self.platform.synchronize()
        except Exception:
            logger.warning("kernel warm-up failed; its kernels compile on first use", exc_info=True)
        waited = time.perf_counter() - start
        self.kernel_warm_up_wait_seconds += waited
        return waited

    def _logit_rows(self, hidden: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """The rows of hidden to sample, padded up to the next of logit_row_counts (the last one repeated, or
        a decode graph's own padding rows): the LM head then runs at the row counts warm_up_logits ran. A
        library matmul at a row count new to it may load a kernel, and that waits for the device to drain
        (CUDA's lazy module loading: on an H200 the host waited in the LM head of each of P1's first eager
        steps, about 200 ms, then prepared the next step while the device stood idle, 12-13 ms a step)."""
        rows = self.logit_row_counts[bisect.bisect_left(self.logit_row_counts, len(indices))]
        if indices[-1] == len(indices) - 1 and hidden.shape[0] >= rows:
            return hidden[:rows]  # every row is sampled (a decode step): no gather, no index copy
        index = np.full(rows, indices[-1], dtype=np.int64)
        index[:len(indices)] = indices
        return hidden[self.platform.to_device(index, self.device)]

    @torch.inference_mode()
    def warm_up_logits(self) -> None:
        """Run the LM head once at each of logit_row_counts (every rank: under tensor parallelism it gathers), and
        the sampler's threshold kernel once, so that no request compiles it (where no memory profile ran)."""
        hidden = torch.zeros(self.logit_row_counts[-1], self.model_config.hidden_size, dtype=self.dtype,
                             device=self.device)
        for rows in self.logit_row_counts:
            logits = self.model.compute_logits(hidden[:rows])
        rows = self.sampler.threshold_kernel_min_rows()
        if rows is not None and rows <= self.config.max_num_seqs:
            # Top-p without a top-k: a draw over the whole vocabulary, the kernel's one launch signature.
            params = SamplingParams(temperature=0.7, top_p=0.9)
            requests = [_ProfileSequence(1, [], request_id=f"warm-up-{i}", sampling_params=params)
                        for i in range(rows)]
            self.sampler(logits[:rows], build_sampling_batch(requests, self.model_config.vocab_size, self.device,
                                                             self.platform.to_device, None))
        self.platform.synchronize()

    def _captures_graphs(self) -> bool:
        return not self.config.enforce_eager and self.platform.supports_graphs and self.backend.graph_capturable

    def _graph_ladders(self, capture_only=None, after_each=None) -> list:
        """The decode and prefill graphs on the current cache (capture_only, after_each: graph_runner's)."""
        from sageinfer.executor.graph_runner import DecodeGraphs, PrefillGraphs
        c = self.config
        return [DecodeGraphs(self.model, self.backend, self.platform, self.device, c.max_num_seqs, c.max_model_len,
                             self.block_size, self.num_kv_heads, self.kv_caches, c.max_graph_batch_size, capture_only,
                             after_each),
                PrefillGraphs(self.model, self.backend, self.platform, self.device, c.max_num_batched_tokens,
                              c.max_model_len, self.block_size, self.num_kv_heads, self.kv_caches, capture_only,
                              after_each)]

    def capture_graphs(self) -> float:
        """Capture decode graphs if the platform can; returns the capture time in seconds."""
        if not self._captures_graphs():
            return 0.0
        self.platform.synchronize()
        free = self.platform.mem_get_info()[0]
        self.graphs, self.prefill_graphs = self._graph_ladders()
        self.platform.synchronize()
        self.graph_memory_bytes = free - self.platform.mem_get_info()[0]
        if self.graph_memory is not None:
            logger.info("the graphs took %.2f GiB of the device (estimated %.2f GiB)", self.graph_memory_bytes / 2**30,
                        self.graph_memory.bytes / 2**30)
        return self.graphs.capture_seconds + self.prefill_graphs.capture_seconds

    # ---- one step (hot path: keep per-token Python work out of here) ---------------------
    def _host_inputs(self, scheduled: list) -> HostInputs:
        bs = self.block_size
        num_seqs = len(scheduled)
        query_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((r.num_computed_tokens for r, _ in scheduled), dtype=np.int64, count=num_seqs)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_lens = starts + query_lens
        max_blocks = int((seq_lens.max() + bs - 1) // bs)
        block_table = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        input_ids = np.empty(num_tokens, dtype=np.int64)
        sampled_requests, logits_indices = [], []
        fill_index, fill_row = [], []
        wants_prompt_logprobs = False
        for i, (request, n) in enumerate(scheduled):
            wants_prompt_logprobs |= request.sampling_params.prompt_logprobs is not None
            blocks = request.block_ids
            block_table[i, :len(blocks)] = blocks
            s = int(starts[i])
            end = int(query_start_loc[i + 1])
            if n == 1:
                input_ids[end - 1] = request.all_token_ids[s]
            else:
                input_ids[end - n:end] = request.all_token_ids[s:s + n]
            if s + n == request.num_tokens:  # the last token is computed: sample the next
                sampled_requests.append(request)
                logits_indices.append(end - 1)
                if request.num_pending_tokens:  # its input is still on the device (async scheduling)
                    input_ids[end - 1] = 0
                    fill_index.append(end - 1)
                    fill_row.append(request.last_sampled_row)
        seq_index = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(num_tokens) - query_start_loc[seq_index] + starts[seq_index]
        slot_mapping = block_table[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        max_query_len = int(query_lens.max())
        return HostInputs(num_tokens, input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_table,
                          max_query_len, sampled_requests, logits_indices,
                          np.array(fill_index, dtype=np.int64), np.array(fill_row, dtype=np.int64),
                          self.backend.cascade_prefix_tokens(block_table, seq_lens, bs, max_query_len),
                          wants_prompt_logprobs)

    def _fill_pending(self, input_ids: torch.Tensor, host: HostInputs, prev_token_ids: torch.Tensor | None) -> None:
        """Write tokens sampled by the previous, still unread step into this step's inputs, on the device."""
        if len(host.fill_index):
            index = self.platform.to_device(host.fill_index, self.device)
            rows = self.platform.to_device(host.fill_row, self.device)
            input_ids[index] = prev_token_ids[rows]

    def _eager_forward(self, host: HostInputs, prev_token_ids: torch.Tensor | None, after_layer=None) -> torch.Tensor:
        dev, to_device = self.device, self.platform.to_device
        meta = AttentionMetadata(
            num_actual_tokens=host.num_tokens,
            slot_mapping=to_device(host.slot_mapping, dev),
            query_start_loc=to_device(host.query_start_loc.astype(np.int32), dev),
            seq_lens=to_device(host.seq_lens.astype(np.int32), dev),
            block_table=to_device(host.block_table, dev),
            max_query_len=host.max_query_len, max_seq_len=int(host.seq_lens.max()),
            query_start_loc_cpu=host.query_start_loc.tolist(), seq_lens_cpu=host.seq_lens.tolist(),
            block_table_cpu=host.block_table,
            cascade_prefix_len=(to_device(np.array([host.cascade_prefix_len], dtype=np.int32), dev)
                                if host.cascade_prefix_len else None),
            after_layer=after_layer)
        self.backend.plan(meta, self.num_kv_heads)
        input_ids = to_device(host.input_ids, dev)
        self._fill_pending(input_ids, host, prev_token_ids)
        positions = to_device(host.positions, dev)
        return self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def execute(self, scheduled: list, prev_token_ids: torch.Tensor | None = None, after_layer=None,
                defer_token_masks: bool = False) -> StepResult:
        """Launch one step. prev_token_ids: the previous step's sampled tokens, still on the device,
        for requests whose newest token is a placeholder. after_layer: called after each layer of an
        eager step is enqueued (KV leaving layer by layer); a step that a graph runs calls nothing (its
        KV is then copied whole, once its prefill ends: a short prompt alone, or one decode token).
        defer_token_masks: the forward and the logits only; sample_pending draws once the masks that read
        the host's tokens (bad words, grammars' bitmasks) can be made. Nothing here waits for the device."""
        scheduled = single_token_first(scheduled)
        host = self._host_inputs(scheduled)
        prompt_spans = None
        if host.wants_prompt_logprobs:
            prompt_spans = prompt_logprobs.find_spans(scheduled, host.seq_lens - np.diff(host.query_start_loc),
                                                      host.query_start_loc)
        if prompt_spans is not None:  # needs every row's hidden state: the graphs keep only what they sample
            hidden = self._eager_forward(host, prev_token_ids, after_layer)
        elif self.graphs is not None and self.graphs.can_run(len(scheduled), host.max_query_len):
            hidden = self.graphs.run(host, lambda ids: self._fill_pending(ids, host, prev_token_ids))
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(scheduled, host):
            hidden = self.prefill_graphs.run(host)
        else:
            hidden = self._eager_forward(host, prev_token_ids, after_layer)
        prompt_out = None if prompt_spans is None else prompt_logprobs.compute(
            self.model, hidden, prompt_spans, self.platform.to_device, self.platform.to_host_async)
        if not host.sampled_requests:
            return StepResult([], None, prompt_out, host)
        logits = self.model.compute_logits(self._logit_rows(hidden, host.logits_indices))[:len(host.logits_indices)]
        batch = build_sampling_batch(host.sampled_requests, self.model_config.vocab_size, self.device,
                                     self.platform.to_device, self.penalties, prev_token_ids,
                                     token_masks=not defer_token_masks)
        if defer_token_masks:
            return StepResult(host.sampled_requests, None, prompt_out, host, pending=(logits, batch))
        return StepResult(host.sampled_requests, self._sample(logits, batch), prompt_out, host)

    def sample_pending(self, result: StepResult) -> SamplerOutput | None:
        """Draw the tokens of a step launched with defer_token_masks, its requests' bad words and grammar
        bitmasks now read from their tokens; sets and returns result.sampler_output."""
        if result.pending is not None:
            (logits, batch), result.pending = result.pending, None
            add_token_masks(batch, result.sampled_requests, self.device, self.platform.to_device)
            result.sampler_output = self._sample(logits, batch)
        return result.sampler_output

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        out = self.sampler(logits, batch)
        tensors = [out.token_ids]
        if out.logprobs is not None:
            tensors += [out.logprobs, out.logprob_token_ids, out.sampled_ranks]
        out.host_copy = self.platform.to_host_async(tensors)
        return out


def single_token_first(scheduled: list) -> list:
    """The step's sequences with one new token (decodes) ahead of the others, each group in its
    order: an attention backend can then give a mixed step's decodes to its decode kernel."""
    decodes = [s for s in scheduled if s[1] == 1]
    if len(decodes) in (0, len(scheduled)):
        return scheduled
    return decodes + [s for s in scheduled if s[1] != 1]


@dataclass
class HostInputs:
    """One step's flat batch as host arrays, before it goes to the device."""
    num_tokens: int
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray
    max_query_len: int
    sampled_requests: list
    logits_indices: list
    fill_index: np.ndarray  # flat token positions whose ids come from the previous step's device output
    fill_row: np.ndarray    # ... and their rows in it
    cascade_prefix_len: int = 0  # leading tokens all sequences share, to attend once (0: none)
    wants_prompt_logprobs: bool = False  # a scheduled request asks for the logprobs of its prompt


class _ProfileSequence:
    """A stand-in request for the memory-profiling run and the warm-up: greedy, the tokens after
    num_computed_tokens new."""

    def __init__(self, num_tokens: int, block_ids: list[int], num_computed_tokens: int = 0,
                 request_id: str = "profile", sampling_params: SamplingParams | None = None):
        self.request_id = request_id
        self.all_token_ids = [0] * num_tokens
        self.prompt_token_ids = self.all_token_ids
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = num_computed_tokens
        self.block_ids = block_ids
        self.sampling_params = sampling_params or SamplingParams(temperature=0.0)
        self.generator = None
        self.eos_token_ids: set[int] = set()
        self.num_pending_tokens = 0
        self.last_sampled_row = -1
        self.grammar_bitmask = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return 0
