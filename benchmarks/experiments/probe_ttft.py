"""Time each engine step of single max_tokens=1 requests (TTFT anatomy), async vs sync scheduling.

  python benchmarks/experiments/probe_ttft.py
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR  # noqa: E402


def main():
    llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
              max_num_seqs=1024, max_num_batched_tokens=16384, show_progress=False)
    engine = llm.engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    platform = engine.platform
    original = platform.to_host_async
    staging = {}

    def deferred(tensors):  # read with a plain blocking copy at processing time (run-4 behaviour)
        class Handle:
            def synchronize(self):
                pass

        class Lazy(list):
            pass
        return _LazyHost(tensors), Handle()

    def reused(tensors):  # pinned buffers allocated once and reused
        host = []
        for i, t in enumerate(tensors):
            key = (i, t.dtype)
            if key not in staging or staging[key].numel() < t.numel():
                staging[key] = torch.empty(max(t.numel(), 4096), dtype=t.dtype, pin_memory=True)
            h = staging[key][:t.numel()].view(t.shape)
            h.copy_(t, non_blocking=True)
            host.append(h)
        event = torch.cuda.Event()
        event.record()
        return host, event

    variants = [("pinned-alloc+event", original), ("deferred-blocking", deferred), ("reused-pinned+event", reused)]
    for name, fn in variants:
        platform.to_host_async = fn
        mode = True
        for trial in range(5):
            ids = rng.integers(1000, 150000, size=512).tolist()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.add_request(f"{mode}-{trial}", {"prompt_token_ids": ids}, params)
            marks = []
            while engine.has_unfinished_requests():
                engine.step()
                marks.append(time.perf_counter() - t0)
            print(f"{name} trial {trial}: steps at " + ", ".join(f"{1e3 * m:.1f}" for m in marks) + " ms")


class _LazyHost(list):
    """Device tensors that copy to the host (blocking) when read."""

    def __init__(self, tensors):
        super().__init__(tensors)

    def __iter__(self):
        return (t.cpu() for t in list.__iter__(self))


if __name__ == "__main__":
    main()
