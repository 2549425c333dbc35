"""The sampler's time a step for batches of R rows over a vocabulary of V tokens (Qwen3's 151,936 by default),
for the sampling settings users serve with: greedy, Qwen3's generation config (temperature 0.6, top-k 20,
top-p 0.95), top-p alone (Llama 3's: temperature 0.6, top-p 0.9), min-p alone, and Qwen3's settings drawn over
the whole vocabulary (the sampler before a small top-k drew among its tokens alone: TOP_K_DRAW_MAX 0). Draws over
the whole vocabulary are timed both ways: sorting it, and through the threshold kernel (the Triton platforms'
path, here at every batch size, below THRESHOLD_KERNEL_MIN_ROWS too, to find where it pays; on a machine
without a GPU the kernel columns are left out, as the interpreter times nothing useful).
Prints a table of milliseconds a step (the median of --repeats, after a warm-up), on the GPU when there is one.

With --kernel-shapes (GPU only), a second table times the threshold kernel alone for top-p 0.9 rows in each
shape given as BLOCKxPIVOTSxWARPS (its tokens checked against the default shape's).

  python benchmarks/sampler_speed.py [--rows 1,64,256,1024] [--vocab 151936] [--repeats 20]
      [--kernel-shapes 512x16x8,1024x8x8,256x32x4]
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

SETTINGS = {  # name: (sampling parameters, the sampler's bound on drawing among the top-k, the threshold kernel)
    "greedy": (dict(temperature=0.0), sampler.TOP_K_DRAW_MAX, False),
    "qwen3 (k20 p0.95)": (dict(temperature=0.6, top_k=20, top_p=0.95), sampler.TOP_K_DRAW_MAX, False),
    "qwen3, vocabulary sorted": (dict(temperature=0.6, top_k=20, top_p=0.95), 0, False),
    "qwen3, vocabulary by threshold": (dict(temperature=0.6, top_k=20, top_p=0.95), 0, True),
    "top-p 0.9 alone, sorted": (dict(temperature=0.6, top_p=0.9), sampler.TOP_K_DRAW_MAX, False),
    "top-p 0.9 alone, by threshold": (dict(temperature=0.6, top_p=0.9), sampler.TOP_K_DRAW_MAX, True),
    "min-p 0.1 alone": (dict(temperature=0.8, min_p=0.1), sampler.TOP_K_DRAW_MAX, False),
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
    parser.add_argument("--kernel-shapes", default="")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows_list = [int(r) for r in args.rows.split(",")]
    def to_device(array, dev):
        return torch.as_tensor(array).to(dev)

    penalties = PenaltyState(args.vocab, device, to_device)
    settings = {name: setting for name, setting in SETTINGS.items() if device.type == "cuda" or not setting[2]}
    table = {}
    for rows in tqdm(rows_list, desc="batch sizes"):
        logits = torch.randn(rows, args.vocab, device=device) * 3
        for name, (options, bound, threshold_kernel) in settings.items():
            batch = build_sampling_batch(_requests(rows, SamplingParams(max_tokens=16, **options)), args.vocab,
                                         device, to_device, penalties)
            sampler.TOP_K_DRAW_MAX, kept = bound, sampler.TOP_K_DRAW_MAX
            sampler.THRESHOLD_KERNEL_MIN_ROWS, kept_rows = 0, sampler.THRESHOLD_KERNEL_MIN_ROWS  # at every size
            try:
                sample = sampler.Sampler(threshold_kernel=threshold_kernel)
                _time_ms(lambda: sample(logits, batch), device, 3)  # warm-up
                table[rows, name] = _time_ms(lambda: sample(logits, batch), device, args.repeats)
            finally:
                sampler.TOP_K_DRAW_MAX, sampler.THRESHOLD_KERNEL_MIN_ROWS = kept, kept_rows
    print(f"sampler, ms a step ({device.type}, vocabulary {args.vocab}, median of {args.repeats})")
    print("| rows | " + " | ".join(settings) + " |")
    print("| --- |" + " --- |" * len(settings))
    for rows in rows_list:
        print(f"| {rows} | " + " | ".join(f"{table[rows, name]:.3f}" for name in settings) + " |")
    if args.kernel_shapes and device.type == "cuda":
        _time_kernel_shapes(rows_list, args.vocab, args.kernel_shapes.split(","), device, args.repeats)


def _time_kernel_shapes(rows_list: list, vocab: int, shapes: list, device: torch.device, repeats: int) -> None:
    from sageinfer.ops.sampling_thresholds import threshold_draw
    print(f"threshold kernel alone, top-p 0.9, temperature 0.6, ms a call (median of {repeats})")
    print("| rows | " + " | ".join(shapes) + " |")
    print("| --- |" + " --- |" * len(shapes))
    for rows in rows_list:
        probs = (torch.randn(rows, vocab, device=device) * 3 / 0.6).softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        top_k = torch.full((rows,), vocab, device=device)
        top_p, min_p = torch.full((rows,), 0.9, device=device), torch.zeros(rows, device=device)
        expected = threshold_draw(probs, noise, top_k, top_p, min_p)[0]
        times = []
        for shape in shapes:
            block, pivots, warps = (int(v) for v in shape.split("x"))
            run = lambda: threshold_draw(probs, noise, top_k, top_p, min_p, block, pivots, warps)  # noqa: E731
            assert torch.equal(run()[0], expected), shape
            times.append(_time_ms(run, device, repeats))
        print(f"| {rows} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


if __name__ == "__main__":
    main()
