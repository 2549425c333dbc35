"""The sampler's time a step for batches of R rows over a vocabulary of V tokens (Qwen3's 151,936 by default),
for the sampling settings users serve with: greedy, Qwen3's generation config (temperature 0.6, top-k 20,
top-p 0.95), top-p alone (Llama 3's: temperature 0.6, top-p 0.9), min-p alone, and Qwen3's settings on the
path that sorts the vocabulary (the sampler before a small top-k drew among its tokens alone: TOP_K_DRAW_MAX 0).
Prints a table of milliseconds a step (the median of --repeats, after a warm-up), on the GPU when there is one.

  python benchmarks/sampler_speed.py [--rows 1,64,256,1024] [--vocab 151936] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.executor.penalty_state import PenaltyState  # noqa: E402
from sageinfer.executor.sampling_inputs import build_sampling_batch  # noqa: E402
from sageinfer.layers import sampler  # noqa: E402
from sageinfer.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {  # name: (sampling parameters, the sampler's bound on drawing among the top-k)
    "greedy": (dict(temperature=0.0), sampler.TOP_K_DRAW_MAX),
    "qwen3 (k20 p0.95)": (dict(temperature=0.6, top_k=20, top_p=0.95), sampler.TOP_K_DRAW_MAX),
    "qwen3, vocabulary sorted": (dict(temperature=0.6, top_k=20, top_p=0.95), 0),
    "top-p 0.9 alone": (dict(temperature=0.6, top_p=0.9), sampler.TOP_K_DRAW_MAX),
    "min-p 0.1 alone": (dict(temperature=0.8, min_p=0.1), sampler.TOP_K_DRAW_MAX),
}


def _requests(rows: int, params: SamplingParams) -> list:
    return [types.SimpleNamespace(request_id=str(i), sampling_params=params, generator=None, num_output_tokens=1,
                                  eos_token_ids=set(), output_token_ids=[0], grammar_bitmask=None)
            for i in range(rows)]


def _time_ms(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,64,256,1024")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows_list = [int(r) for r in args.rows.split(",")]
    def to_device(array, dev):
        return torch.as_tensor(array).to(dev)

    penalties = PenaltyState(args.vocab, device, to_device)
    table = {}
    for rows in tqdm(rows_list, desc="batch sizes"):
        logits = torch.randn(rows, args.vocab, device=device) * 3
        for name, (options, bound) in SETTINGS.items():
            batch = build_sampling_batch(_requests(rows, SamplingParams(max_tokens=16, **options)), args.vocab,
                                         device, to_device, penalties)
            sampler.TOP_K_DRAW_MAX, kept = bound, sampler.TOP_K_DRAW_MAX
            try:
                sample = sampler.Sampler()
                _time_ms(lambda: sample(logits, batch), device, 3)  # warm-up
                table[rows, name] = _time_ms(lambda: sample(logits, batch), device, args.repeats)
            finally:
                sampler.TOP_K_DRAW_MAX = kept
    print(f"sampler, ms a step ({device.type}, vocabulary {args.vocab}, median of {args.repeats})")
    print("| rows | " + " | ".join(SETTINGS) + " |")
    print("| --- |" + " --- |" * len(SETTINGS))
    for rows in rows_list:
        print(f"| {rows} | " + " | ".join(f"{table[rows, name]:.3f}" for name in SETTINGS) + " |")


if __name__ == "__main__":
    main()
