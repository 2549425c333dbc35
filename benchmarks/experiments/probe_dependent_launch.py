"""L1 (single stream) with and without programmatic dependent launch, each in a fresh engine.

  python benchmarks/experiments/probe_dependent_launch.py --out result.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer import LLM
from sageinfer.bench.runs import run_latency, run_throughput
from sageinfer.bench.workloads import STANDARD_DIR, load_workloads
from sageinfer.platforms.cuda import CudaPlatform


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--workloads", default="L1-single-stream")
    args = parser.parse_args()
    results = {}
    for pdl in (False, True, False, True):
        CudaPlatform.supports_dependent_launch = lambda self, pdl=pdl: pdl
        llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
                  max_num_seqs=1024, max_num_batched_tokens=16384, show_progress=False)
        run_throughput(llm, {"seed": 99, "num_prompts": 8, "input_len": 300, "output_len": 8}, use_tqdm=False)
        for name in args.workloads.split(","):
            w = load_workloads()[name]
            r = run_latency(llm, w) if w["kind"] == "latency" else run_throughput(llm, w, use_tqdm=False)
            results.setdefault(f"{name} dependent launch {pdl}", []).append(r)
            print(f"{name} dependent launch {pdl}: " + (f"TTFT {r['ttft_s'] * 1e3:.2f} ms TPOT {r['tpot_s'] * 1e3:.3f} ms"
                                                         if "tpot_s" in r else f"{r['total_tok_s']:.0f} tok/s"),
                  flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
