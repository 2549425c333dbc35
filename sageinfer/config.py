"""Typed engine configuration, validated once; built from LLM(...) kwargs or CLI flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is parsed, not to read the options (CLI --help)
    import torch

# Names a dtype may be given by -> torch's name for it
_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def parse_dtype(dtype: str | torch.dtype, model_dtype: str | None) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (float32 checkpoints stay float32)."""
    import torch
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = model_dtype or "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return getattr(torch, _DTYPES[dtype])


def _option(default, help: str, choices: tuple | None = None):
    """An engine option: its default, and the help (and choices) its CLI flag shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineConfig:
    """Every engine option, written once: `LLM(...)` takes them as keyword arguments and each CLI
    command that builds an engine derives its flags from these fields (gateway/engine_args.py)."""
    model: str
    tokenizer: str | None = _option(None, "tokenizer directory (default: the model's)")
    dtype: str | torch.dtype = _option("auto", "auto, bfloat16, float16 or float32")
    seed: int = _option(0, "seed of the global random state (unseeded sampling)")
    max_model_len: int | None = _option(None, "context length (default: the model's)")
    block_size: int | None = _option(None, "tokens per KV block (default: the platform's, 64 on CUDA)")
    max_num_seqs: int = _option(256, "sequences that run at once")
    max_num_batched_tokens: int | None = _option(None, "tokens computed per step (default: 8192 with chunked prefill)")
    gpu_memory_utilization: float = _option(0.9, "share of the device's memory the engine may use")
    enable_prefix_caching: bool = _option(True, "reuse the KV blocks of a repeated prefix")
    enable_chunked_prefill: bool = _option(True, "split long prompts over several steps")
    skip_tokenizer_init: bool = _option(False, "no tokenizer: prompts are token ids and outputs have no text")
    load_format: str = _option("auto", "where the weights come from", LOAD_FORMATS)
    trust_remote_code: bool = _option(False, "not supported: sageInfer runs only its own model code")
    device: str | None = _option(None, "the platform: cpu, cuda, rocm or a plugin's (default: $SAGEINFER_PLATFORM, "
                                       "else the first available)")
    # KV cache size given explicitly (CPU runs, tests): a block count or a byte budget.
    num_gpu_blocks_override: int | None = _option(None, "KV cache size in blocks (CPU runs, tests)")
    kv_cache_memory_bytes: int | None = _option(None, "KV cache size in bytes (CPU runs)")
    enforce_eager: bool = _option(False, "no graph capture")
    # Decode batches past the largest graph run eagerly (vLLM's max_cudagraph_capture_size, SGLang's
    # --cuda-graph-max-bs); each size captured costs start-up time and a little memory.
    max_graph_batch_size: int = _option(512, "largest decode batch captured in a graph (larger ones run eagerly)")
    # Launch step N+1 before reading step N's tokens (hides host work behind the device's).
    async_scheduling: bool = _option(True, "launch each step before reading the previous step's tokens")
    # KV cache storage: "auto" (model dtype), "fp8" (e4m3, per-tensor scale), "int8" (per-token-head scales)
    kv_cache_dtype: str = _option("auto", "KV cache storage", ("auto", "fp8", "int8"))
    # Host memory (GiB) for the offload tier: evicted prefix blocks are kept there and brought back.
    kv_offload_gb: float = _option(0.0, "host memory (GiB) for evicted KV blocks")
    # A waiting request is admitted only while every running one keeps room to generate this many
    # more tokens (or up to its max_tokens, if sooner): fewer preemptions, whose recomputation is waste.
    # 0 admits whatever fits now.
    admission_lookahead_tokens: int = _option(
        256, "admit a waiting request only while running ones keep room for this many more tokens")
    # The waiting line: "fcfs" (arrival order) or "priority" (a request's priority, lowest value first,
    # then arrival; preemption takes the least urgent). Requests with a priority need "priority".
    scheduling_policy: str = _option("fcfs", "order of the waiting line", ("fcfs", "priority"))
    # While requests wait, a prompt's prefill takes at most this many tokens a step, so that the step's
    # budget also admits the prompts behind it instead of one long prompt taking it all (vLLM's option of
    # the same name). A prompt with nobody waiting still takes the whole budget. 0: no limit.
    long_prefill_token_threshold: int = _option(
        0, "while requests wait, a prefill takes at most this many tokens a step (0: no limit)")
    # Most logprobs a request may ask for per token (vLLM's --max-logprobs); also capped by the vocabulary.
    max_logprobs: int = _option(20, "most logprobs a request may ask for per token")
    # Sampling values for requests that give none: "auto" (the checkpoint's generation_config.json),
    # "vllm" (none: SamplingParams' own defaults), or a directory holding a generation_config.json.
    generation_config: str = _option("auto", "default sampling values: auto (the model's), vllm (none), or a directory")
    # Weight quantization: None follows the checkpoint (its config.json's quantization_config);
    # "fp8" quantizes a full-precision checkpoint at load time (layers/quantization/config.py).
    quantization: str | None = _option(None, "weight quantization: fp8 (at load time), or the checkpoint's method "
                                             "(compressed-tensors, gptq, awq, fp8; also vLLM's gptq_marlin and "
                                             "awq_marlin) when not given")
    # Ranks the model is split over (heads, MLP columns, vocabulary), one process and device each.
    tensor_parallel_size: int = _option(1, "ranks the model is split over, one device each")
    # How ranks 1..N-1 start: "mp" (processes on this host) or "ray" (Ray actors, on any host of a
    # Ray cluster: RAY_ADDRESS, or a local head).
    distributed_executor_backend: str = _option("mp", "how tensor-parallel ranks start: mp (processes on this "
                                                      "host) or ray (actors of a Ray cluster)", ("mp", "ray"))
    # Prefill/decode separation: the connector that moves KV between instances and this one's role
    # (vLLM's --kv-transfer-config JSON; transport/kv_transfer_config.py).
    kv_transfer_config: str | None = _option(None, "KV transfer between instances (PD), JSON: {\"kv_connector\": "
                                                   "\"DeviceIpcConnector\" | \"SharedMemoryConnector\" | "
                                                   "\"NixlConnector\" | \"TorchDistributedConnector\", \"kv_role\": "
                                                   "\"kv_producer\" | \"kv_consumer\" | \"kv_both\"}")

    # Publish what the prefix cache gains and drops over ZMQ, for cache-aware routing (vLLM's
    # --kv-events-config JSON; transport/kv_events.py).
    kv_events_config: str | None = _option(None, "KV cache events over ZMQ, JSON: {\"enable_kv_cache_events\": true, "
                                                 "\"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": "
                                                 "\"tcp://*:5558\", \"topic\": \"\"}")

    def __post_init__(self) -> None:
        from sageinfer.transport.kv_events import parse_kv_events_config
        from sageinfer.transport.kv_transfer_config import parse_kv_transfer_config
        self.kv_transfer_config = parse_kv_transfer_config(self.kv_transfer_config)
        self.kv_events_config = parse_kv_events_config(self.kv_events_config)
        if self.kv_events_config is not None and not self.enable_prefix_caching:
            raise ValueError("kv_events_config: KV events describe the prefix cache; enable prefix caching")
        connector = (self.kv_transfer_config or {}).get("kv_connector")
        if self.tensor_parallel_size > 1 and connector is not None and connector != "DeviceIpcConnector":
            raise ValueError(f"kv_transfer_config: {connector} moves rank 0's cache only; with tensor_parallel_size "
                             f"> 1 use DeviceIpcConnector (it moves every rank's)")
        if self.tensor_parallel_size > 1 and connector is not None and self.distributed_executor_backend != "mp":
            raise ValueError("kv_transfer_config: DeviceIpcConnector needs every rank on this host "
                             "(distributed_executor_backend mp)")
        if self.tokenizer is None:
            self.tokenizer = self.model
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_graph_batch_size < 1:
            raise ValueError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kv_cache_dtype not in ("auto", "fp8", "int8"):
            raise ValueError(f"kv_cache_dtype must be auto, fp8 or int8, got {self.kv_cache_dtype!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.admission_lookahead_tokens < 0:
            raise ValueError(f"admission_lookahead_tokens must be >= 0, got {self.admission_lookahead_tokens}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        from sageinfer.layers.quantization.config import OPTIONS, SUPPORTED
        if self.quantization not in OPTIONS:
            raise ValueError(f"quantization={self.quantization!r} is not supported; supported: {SUPPORTED}")
        if self.distributed_executor_backend not in ("mp", "ray"):
            raise ValueError(f"distributed_executor_backend must be mp or ray, got {self.distributed_executor_backend!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.kv_offload_gb < 0:
            raise ValueError(f"kv_offload_gb must be >= 0, got {self.kv_offload_gb}")
        if self.kv_offload_gb > 0 and not self.enable_prefix_caching:
            raise ValueError("kv_offload_gb needs enable_prefix_caching=True (offloaded blocks are found by hash)")
        if self.trust_remote_code:
            raise ValueError("trust_remote_code=True is not supported: sageInfer runs only its own model code")

    def finalize(self, model_max_len: int) -> None:
        """Fill the limits that depend on the model once its config is read."""
        if self.max_model_len is None:
            self.max_model_len = model_max_len
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when chunked prefill is disabled")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
