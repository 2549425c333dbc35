"""Where a step's time goes: wall time per engine step vs GPU kernel time, host phases, top kernels.

  python benchmarks/profile_steps.py --batches 1,256 --input-len 512 [engine flags]
  python benchmarks/profile_steps.py --batches "" --prefill-len 1024 --prefill-prompts 16       (T1's prefill)
  python benchmarks/profile_steps.py --batches "" --prefill-len 2200 --prefill-prompts 7 --shared-prefix 2000
                                                                                           (P1's, prefix cached)
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
import sageinfer.executor.model_runner as model_runner  # noqa: E402
from sageinfer.gateway.engine_args import engine_kwargs  # noqa: E402
from standard_args import add_standard_engine_args  # noqa: E402

host_time = collections.defaultdict(float)


def timed(obj, name, label):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            host_time[label] += time.perf_counter() - t
    setattr(obj, name, wrapper)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--prefill-len", type=int, default=0, help="also profile one prefill of this length")
    parser.add_argument("--prefill-prompts", type=int, default=1, help="prompts of --prefill-len prefilled at once")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="the prompts share their first tokens, cached before the profile")
    add_standard_engine_args(parser)
    args = parser.parse_args()
    llm = LLM(**engine_kwargs(args))
    engine, runner = llm.engine, llm.engine.runner
    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.scheduler, "update_after_step", "update")
    timed(runner, "_host_inputs", "host_inputs")
    timed(runner, "execute", "execute")
    timed(model_runner, "build_sampling_batch", "sampling_batch")
    vocab = engine.model_config.vocab_size
    for batch in [int(b) for b in args.batches.split(",") if b]:
        gen = torch.Generator().manual_seed(batch)
        for i in range(batch):
            ids = torch.randint(1000, vocab - 1000, (args.input_len,), generator=gen).tolist()
            engine.add_request(f"b{batch}-{i}", {"prompt_token_ids": ids},
                               SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True))
        while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(5):
            engine.step()
        host_time.clear()
        steps = 40
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - t) / steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine.step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_total = sum(e.self_device_time_total for e in events) / 10 / 1e3  # ms per step
        print(f"\n### decode batch {batch}, context ~{args.input_len}: wall {1e3 * wall:.2f} ms/step, "
              f"GPU kernels {gpu_total:.2f} ms/step ({100 * gpu_total / (1e3 * wall):.0f}% busy)")
        print("host phases per step (ms): " + ", ".join(f"{k} {1e3 * v / steps:.2f}" for k, v in host_time.items()))
        print("| kernel | ms/step | share |\n| --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            ms = e.self_device_time_total / 10 / 1e3
            print(f"| {e.key[:90]} | {ms:.3f} | {100 * ms / gpu_total:.1f}% |")
        for rid in [f"b{batch}-{i}" for i in range(batch)]:
            engine.abort_request(rid)
    if args.prefill_len:
        prefix = torch.randint(1000, vocab - 1000, (args.shared_prefix,)).tolist()
        prompts = [prefix + torch.randint(1000, vocab - 1000, (args.prefill_len - len(prefix),)).tolist()
                   for _ in range(args.prefill_prompts)]
        # The same shapes once first (kernels compiled), then from an empty prefix cache but the shared prefix
        run_prompts(engine, [p[:-1] for p in prompts], "warm")
        engine.kv_manager.pool.reset_prefix_cache()
        if prefix:
            run_prompts(engine, [prefix], "prefix")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_prompts(engine, prompts, "p")
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.self_device_time_total for e in events) / 1e3
        shared = f", the first {len(prefix)} shared and cached" if prefix else ""
        print(f"\n### prefill {len(prompts)} x {args.prefill_len} tokens{shared}: GPU kernels {total:.1f} ms")
        print("| kernel | ms | share |\n| --- | --- | --- |")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
            print(f"| {e.key[:90]} | {e.self_device_time_total / 1e3:.2f} | {100 * e.self_device_time_total / 1e3 / total:.1f}% |")


def run_prompts(engine, prompts: list[list[int]], name: str) -> None:
    """Prefill the prompts (one token out each) and run the engine until they finish."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"{name}-{i}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
