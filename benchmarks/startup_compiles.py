"""Start-up with the Triton cache there is (point TRITON_CACHE_DIR at an empty folder for a machine's
first start): its phases, the kernels it compiles, and whether anything compiles after it, while
serving a first 32K-token prompt, a conversation-like mix, then another 32K prompt (the warm TTFT). The mix's
requests take turns: greedy, Llama 3's sampling (top-p alone) and Qwen3's (top-k 20, top-p 0.95), so that the
sampler's kernels are served too.

  TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/startup_compiles.py --out startup.json [engine flags]

--sample-stacks adds where the start-up thread's wall time went (benchmarks/stack_sampler.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from provenance import source_version  # noqa: E402
from stack_sampler import StackSampler  # noqa: E402
from standard_args import add_standard_engine_args  # noqa: E402
from triton_compiles import CompileLog  # noqa: E402

from sageinfer import LLM, SamplingParams  # noqa: E402
from sageinfer.bench.mixed import mixed_prompts  # noqa: E402
from sageinfer.gateway.engine_args import engine_kwargs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long-prompt", type=int, default=32000, help="tokens of the long prompts")
    parser.add_argument("--mix-prompts", type=int, default=300, help="chat-mix requests served between them")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sample-stacks", action="store_true",
                        help="sample the start-up thread's stack every 2 ms and print where its time went")
    add_standard_engine_args(parser)
    args = parser.parse_args()

    compiles = CompileLog()
    sampler = StackSampler().start() if args.sample_stacks else None
    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    startup = time.perf_counter() - start
    if sampler is not None:
        sampler.stop()
    engine = llm.engine
    at_start_up = compiles.total()
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), **source_version(),
              "device": engine.platform.device_name(), "date": datetime.date.today().isoformat(),
              "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "(default)"),
              "startup_s": startup,
              "model_load_s": engine.model_load_seconds, "model_load_phases": engine.runner.load_phases,
              "memory_profile_s": engine.memory_profile_seconds, "graph_memory_bytes": engine.runner.graph_memory_bytes,
              "graph_memory_estimate": engine.runner.graph_memory._asdict() if engine.runner.graph_memory else None,
              "kernel_warm_up_wait_s": engine.kernel_warm_up_seconds, "graph_capture_s": engine.graph_capture_seconds,
              "long_prompt_warm_up_s": engine.long_prompt_warm_up_seconds,
              "start_up_compiles": at_start_up[0], "start_up_compile_s": at_start_up[1],
              "start_up_compiles_by_kernel": {k: [compiles.count[k], compiles.seconds[k]] for k in compiles.count}}
    print(f"start-up {startup:.1f} s: model load {engine.model_load_seconds:.1f} s "
          f"({', '.join(f'{k[:-2]} {v:.1f}' for k, v in engine.runner.load_phases.items())}), memory profile "
          f"{engine.memory_profile_seconds:.1f} s, then waited {engine.kernel_warm_up_seconds:.1f} s "
          f"for the kernel warm-up, graph capture {engine.graph_capture_seconds:.1f} s, "
          f"long-prompt warm-up {engine.long_prompt_warm_up_seconds:.1f} s; "
          f"{at_start_up[0]} compiles or disk-cache loads, {at_start_up[1]:.1f} s of them (threads overlap)", flush=True)
    print(compiles.table(15), flush=True)
    if sampler is not None:
        record["start_up_stacks"] = sampler.record()
        print(sampler.table(), flush=True)

    compiles.reset()
    vocab = engine.model_config.vocab_size
    long_len = min(args.long_prompt, engine.config.max_model_len - 1)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def long_prompt(seed: int) -> float:
        prompt, _ = mixed_prompts("chat-mix", 1, vocab, seed, long_len + 1)
        tokens = (prompt[0] * (long_len // len(prompt[0]) + 1))[:long_len]  # a prompt of exactly long_len
        tokens[0] = seed  # no prefix shared with the other long prompt
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": tokens}], one, use_tqdm=False)
        return time.perf_counter() - t

    record["first_long_prompt_s"] = long_prompt(1)
    prompts, out_lens = mixed_prompts("chat-mix", args.mix_prompts, vocab, 0, engine.config.max_model_len)
    t = time.perf_counter()
    settings = [dict(temperature=0.0), dict(temperature=0.6, top_p=0.9), dict(temperature=0.6, top_k=20, top_p=0.95)]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 [SamplingParams(max_tokens=n, ignore_eos=True, **settings[i % 3]) for i, n in enumerate(out_lens)],
                 use_tqdm=False)
    record["mix_s"] = time.perf_counter() - t
    record["second_long_prompt_s"] = long_prompt(2)
    after = compiles.total()
    record.update(serving_compiles=after[0], serving_compile_s=after[1],
                  serving_compiles_by_kernel={k: [compiles.count[k], compiles.seconds[k], compiles.signatures[k]]
                                              for k in compiles.count})
    compiles.close()
    print(f"{long_len}-token prompt, one output token: first {record['first_long_prompt_s']:.3f} s, after "
          f"{args.mix_prompts} chat-mix requests ({record['mix_s']:.1f} s) {record['second_long_prompt_s']:.3f} s; "
          f"compiles while serving: {after[0]} ({after[1]:.1f} s)", flush=True)
    if after[0]:
        print(compiles.table(15), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
