"""Time each engine step of single max_tokens=1 requests (TTFT anatomy), async vs sync scheduling.

  python benchmarks/probe_ttft.py
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR  # noqa: E402


def main():
    llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
              max_num_seqs=1024, max_num_batched_tokens=16384, show_progress=False)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for mode in (True, False, True):
        engine.async_scheduling = mode
        for trial in range(4):
            ids = rng.integers(1000, 150000, size=512).tolist()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.add_request(f"{mode}-{trial}", {"prompt_token_ids": ids}, params)
            marks = []
            while engine.has_unfinished_requests():
                engine.step()
                marks.append(time.perf_counter() - t0)
            print(f"async={mode} trial {trial}: steps at " + ", ".join(f"{1e3 * m:.1f}" for m in marks) + " ms")


if __name__ == "__main__":
    main()
