"""Engine flags shared by every CLI command that builds an engine (vLLM's names)."""
from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=model_required, default=None,
                   help="HF model directory (default: a tiny random model built and cached on first use)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the platform's, 64 on CUDA)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache size, GiB (CPU runs)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: the first available platform)")
    g.add_argument("--enforce-eager", action="store_true", help="no graph capture")
    g.add_argument("--attention-backend", default=None, choices=["torch_ref", "triton"])
    g.add_argument("--skip-tokenizer-init", action="store_true")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "int8"])
    g.add_argument("--kv-offload-gb", type=float, default=0.0, help="host memory for evicted KV blocks")
    g.add_argument("--admission-lookahead-tokens", type=int, default=256,
                   help="admit a waiting request only while running ones keep room for this many more tokens")
    g.add_argument("--max-logprobs", type=int, default=20, help="most logprobs a request may ask for per token")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="read each step's tokens before launching the next")


def engine_kwargs(args: argparse.Namespace) -> dict:
    from sageinfer.models.tiny import default_model_path
    model = args.model or default_model_path()
    return dict(
        model=model, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill, load_format=args.load_format,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=int(args.kv_cache_memory_gb * 2**30) if args.kv_cache_memory_gb else None,
        device=args.device, enforce_eager=args.enforce_eager, attention_backend=args.attention_backend,
        skip_tokenizer_init=args.skip_tokenizer_init, async_scheduling=args.async_scheduling,
        kv_cache_dtype=args.kv_cache_dtype, kv_offload_gb=args.kv_offload_gb,
        admission_lookahead_tokens=args.admission_lookahead_tokens, max_logprobs=args.max_logprobs)
