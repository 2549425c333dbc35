"""The offload tier's effect when the device cache is too small to keep a shared prefix.

Phase A: 64 prompts = prefix PA (2000 tokens) + 200 unique; phase B: the same with prefix PB, which
evicts PA from a 1,600-block cache; phase A': 64 new prompts on PA again. With the tier, PA comes
back from host memory instead of being prefilled again.

  python benchmarks/offload_effect.py --out offload.json
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR  # noqa: E402


def phase_prompts(rng, prefix, n=64, unique=200, vocab=151936):
    return [{"prompt_token_ids": prefix + rng.integers(1000, vocab - 1000, size=unique).tolist()} for _ in range(n)]


def run(offload_gb: float) -> dict:
    llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
              num_gpu_blocks_override=1600, max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=16384,
              kv_offload_gb=offload_gb, show_progress=False)
    engine = llm.engine
    rng = np.random.default_rng(7)
    pa = rng.integers(1000, 150000, size=2000).tolist()
    pb = rng.integers(1000, 150000, size=2000).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    llm.generate(phase_prompts(rng, rng.integers(1000, 150000, size=300).tolist(), n=8), params, use_tqdm=False)
    result = {}
    for name, prefix in (("A", pa), ("B", pb), ("A_again", pa)):
        prompts = phase_prompts(rng, prefix)
        before = engine.num_prompt_tokens_computed
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        result[name] = {"seconds": seconds, "prompt_tokens_computed": engine.num_prompt_tokens_computed - before,
                        "cached_tokens_first_request": outs[0].num_cached_tokens}
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
    results = {"no offload": run(0.0), "offload 8 GiB": run(8.0)}
    print("| config | phase A' seconds | A' prompt tokens computed | A' first request cached | blocks loaded |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        a = r["A_again"]
        print(f"| {name} | {a['seconds']:.2f} | {a['prompt_tokens_computed']} | {a['cached_tokens_first_request']} | "
              f"{r['offload_blocks_loaded']} |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(args.out, "w") as f:
            json.dump({"command": "python3 benchmarks/offload_effect.py --out offload.json", "git_commit": commit or None,
                       "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
