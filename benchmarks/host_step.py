"""The engine's host time a decode step, with the model's forward stubbed out (it returns zeros at once): what is
left is scheduling, input preparation, the LM head and sampler of a tiny model, and reading and applying each
step's tokens (detokenizing, stop checks, logprobs, outputs). A GPU step shorter than this leaves the device idle.
Runs on a CPU; the tiny model's vocabulary is 512, so the sampler's share is far below a real one's.

  python benchmarks/host_step.py [--seqs 256] [--output-len 64] [--temperature 0.0] [--logprobs 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.models.tiny import build_tiny_model  # noqa: E402
from profile_steps import host_time, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--logprobs", type=int, default=None)
    args = parser.parse_args()
    path = build_tiny_model(os.path.join(tempfile.mkdtemp(), "qwen3"), "qwen3", seed=3)
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=4 * args.seqs * 4, max_model_len=1024,
              max_num_seqs=args.seqs, max_num_batched_tokens=16384, show_progress=False)
    engine, runner = llm.engine, llm.engine.runner
    hidden_size = runner.model_config.hidden_size
    runner._eager_forward = lambda host, prev, after: torch.zeros(len(host.input_ids), hidden_size,
                                                                  dtype=runner.dtype, device=runner.device)
    for obj, name in ((engine.scheduler, "schedule"), (runner, "_host_inputs"), (runner, "_sample"),
                      (engine, "_process")):
        timed(obj, name, name)
    prompts = [{"prompt_token_ids": [(7 * i + j) % 500 + 3 for j in range(args.prompt_len)]} for i in range(args.seqs)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True,
                            logprobs=args.logprobs)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    host_time.clear()
    steps = args.output_len + 1  # the prefill step, then a decode step a token (every prompt fits one step)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    print(f"{args.seqs} sequences, {args.output_len} tokens, temperature {args.temperature}, logprobs {args.logprobs}: "
          f"{wall * 1e3 / steps:.2f} ms a step; of it " +
          ", ".join(f"{name} {t * 1e3 / steps:.2f}" for name, t in host_time.items()))


if __name__ == "__main__":
    main()
