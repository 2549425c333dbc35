"""The offload tier's effect when the device cache is too small to keep earlier conversations.

Phase A: 32 conversations, each its own 2,000-token context + 100 new tokens (16 output tokens);
phase B: 32 other conversations, which evict A's blocks from a 1,600-block (25,600-token) cache;
phase A': a follow-up turn of every A conversation (its context again + 100 new tokens). Without
the tier A' prefills all 32 contexts again; with it, their blocks come back from host memory.

  python benchmarks/experiments/offload_effect.py --out offload.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR  # noqa: E402


def turn_prompts(rng, contexts, new_tokens=100, vocab=151936):
    return [{"prompt_token_ids": c + rng.integers(1000, vocab - 1000, size=new_tokens).tolist()} for c in contexts]


def run(offload_gb: float, conversations: int = 32, context_len: int = 2000) -> dict:
    llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
              num_gpu_blocks_override=1600, max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=16384,
              kv_offload_gb=offload_gb, show_progress=False)
    engine = llm.engine
    rng = np.random.default_rng(7)
    contexts_a = [rng.integers(1000, 150000, size=context_len).tolist() for _ in range(conversations)]
    contexts_b = [rng.integers(1000, 150000, size=context_len).tolist() for _ in range(conversations)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm.generate(turn_prompts(rng, [rng.integers(1000, 150000, size=300).tolist()] * 8), params, use_tqdm=False)
    result = {}
    for name, contexts in (("A", contexts_a), ("B", contexts_b), ("A_again", contexts_a)):
        prompts = turn_prompts(rng, contexts)
        before = engine.num_prompt_tokens_computed
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result[name] = {"seconds": seconds, "prompt_tokens_computed": engine.num_prompt_tokens_computed - before,
                        "cached_tokens": sum(o.num_cached_tokens for o in outs)}
    connector = engine.kv_manager.connector
    result["offload_blocks_saved"] = connector.saved_blocks if connector else 0
    result["offload_blocks_loaded"] = connector.loaded_blocks if connector else 0
    result["device_evictions"] = engine.kv_manager.pool.evictions
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {"no offload": run(0.0), "offload 20 GiB": run(20.0)}
    print("| config | phase A' seconds | A' prompt tokens computed | A' tokens from cache or host | blocks loaded |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        a = r["A_again"]
        print(f"| {name} | {a['seconds']:.2f} | {a['prompt_tokens_computed']} | {a['cached_tokens']} | "
              f"{r['offload_blocks_loaded']} |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.out, "w") as f:
            json.dump({"command": "python3 benchmarks/experiments/offload_effect.py --out offload.json", "git_commit": commit or None,
                       "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
