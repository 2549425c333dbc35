"""Run the standard workloads in one process (one model load) and compare with vLLM's numbers.

  python benchmarks/run_standard.py --workloads T1-prefill-heavy,T2-decode-heavy,L1-single-stream,L2-long-context \
      --out result.json [engine flags, e.g. --max-num-seqs 1024 --max-num-batched-tokens 16384]

Dummy weights of sageinfer/bench/standard/qwen3-8b (bf16) unless --model says otherwise.
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
from sageinfer import LLM  # noqa: E402
from sageinfer.bench.roofline import decode_bandwidth_gbs, model_sizes, prefill_flops  # noqa: E402
from sageinfer.bench.mixed import MIXES  # noqa: E402
from sageinfer.bench.runs import run_latency, run_throughput  # noqa: E402
from sageinfer.bench.workloads import load_anchors, load_workloads  # noqa: E402
from sageinfer.gateway.engine_args import engine_kwargs  # noqa: E402
from standard_args import add_standard_engine_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", default="T1-prefill-heavy,T2-decode-heavy,L1-single-stream,L2-long-context")
    parser.add_argument("--out", default=None)
    parser.add_argument("--anchor-set", default="bf16", choices=["bf16", "fp8"])
    parser.add_argument("--prefill-attention-config", default=None, help="JSON file from tune_attention.py")
    parser.add_argument("--mix-prompts", type=int, default=2000, help="requests of a mixed-length workload")
    add_standard_engine_args(parser)
    args = parser.parse_args()
    if args.prefill_attention_config:
        import sageinfer.ops.paged_attention as pa
        with open(args.prefill_attention_config) as f:
            pa.PREFILL_CONFIG = json.load(f)
        print("prefill attention config", pa.PREFILL_CONFIG)
    workloads, anchors = load_workloads(), load_anchors()
    for mix in MIXES:  # mixed lengths (sageinfer/bench/mixed.py): --workloads chat-mix,summarize-mix
        workloads[mix] = {"kind": "throughput", "mix": mix, "num_prompts": args.mix_prompts, "seed": 0}
    anchor_w = anchors["workloads"] if args.anchor_set == "bf16" else anchors["fp8_weights_and_kv"]["workloads"]
    ceilings = anchors["ceilings"]

    start = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    startup = time.perf_counter() - start
    engine = llm.engine
    sizes = model_sizes(llm)
    print(f"startup {startup:.1f} s; KV cache {engine.num_kv_blocks} blocks = "
          f"{(engine.num_kv_blocks - 1) * engine.config.block_size} tokens; graph capture "
          f"{engine.graph_capture_seconds:.1f} s; attention-kernel warm-up waited {engine.kernel_warm_up_seconds:.1f} s; "
          f"long-prompt warm-up {engine.long_prompt_warm_up_seconds:.1f} s; device "
          f"{engine.platform.device_name()}", flush=True)
    estimate = engine.runner.graph_memory
    print(f"graphs took {engine.runner.graph_memory_bytes / 2**30:.3f} GiB of the device"
          + (f" (estimated {estimate.bytes / 2**30:.3f} GiB from {estimate.captured} of {estimate.graphs}: "
             f"{estimate.measured_bytes / 2**30:.3f} GiB, {estimate.per_graph_bytes / 2**20:.1f} MiB a graph more)"
             if estimate else ""), flush=True)

    # Warm-up: compile kernels for the prefill and decode shapes outside the timed runs.
    warm = {"seed": 99, "num_prompts": 8, "input_len": 300, "output_len": 8}
    run_throughput(llm, warm, use_tqdm=False)

    results = {}
    for name in args.workloads.split(","):
        w = workloads[name]
        print(f"== {name}: {w}", flush=True)
        if w["kind"] == "throughput":
            r = run_throughput(llm, w)
            tokens = r["prompt_tokens"] + r["generated_tokens"]
            r["matmul_tflops"] = 2.0 * sizes["matmul_params"] * tokens / r["seconds"] / 1e12
            r["matmul_fraction_of_ceiling"] = r["matmul_tflops"] * 1e12 / (ceilings["bf16_matmul_tflops"] * 1e12)
            if name in anchor_w:  # the mixes have no shared anchor: run vLLM beside them on the device
                r["vs_vllm"] = r["total_tok_s"] / anchor_w[name]["total_tok_s"]
        else:
            r = run_latency(llm, w)
            ctx = w["input_len"] + w["output_len"] // 2
            r["decode_gbs"] = decode_bandwidth_gbs(sizes, r["tpot_s"], ctx, w["batch"])
            r["decode_fraction_of_bandwidth"] = r["decode_gbs"] / ceilings["copy_bandwidth_gbs"]
            r["prefill_tflops"] = prefill_flops(sizes, w["input_len"]) * w["batch"] / r["ttft_s"] / 1e12
            r["prefill_fraction_of_matmul"] = r["prefill_tflops"] / ceilings["bf16_matmul_tflops"]
            r["ttft_vs_vllm"] = r["ttft_s"] / anchor_w[name]["ttft_s"]
            r["tpot_vs_vllm"] = r["tpot_s"] / anchor_w[name]["tpot_s"]
        results[name] = r
        print(json.dumps(r), flush=True)

    print("\n| workload | result | vLLM | ratio | roofline |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        a = anchor_w[name]
        if "total_tok_s" in r:
            print(f"| {name} | {r['total_tok_s']:.0f} tok/s | {a['total_tok_s']:.0f} tok/s | {r['vs_vllm']:.2f}x "
                  f"| matmul {100 * r['matmul_fraction_of_ceiling']:.0f}% |")
        else:
            print(f"| {name} | TTFT {1e3 * r['ttft_s']:.1f} ms, TPOT {1e3 * r['tpot_s']:.2f} ms | TTFT "
                  f"{1e3 * a['ttft_s']:.1f} ms, TPOT {1e3 * a['tpot_s']:.2f} ms | TTFT {r['ttft_vs_vllm']:.2f}x, "
                  f"TPOT {r['tpot_vs_vllm']:.2f}x (lower is better) | decode BW "
                  f"{100 * r['decode_fraction_of_bandwidth']:.0f}%, prefill {100 * r['prefill_fraction_of_matmul']:.0f}% |")
    if args.out:
        record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), **source_version(),
                  "device": engine.platform.device_name(), "date": datetime.date.today().isoformat(),
                  "startup_s": startup, "graph_capture_s": engine.graph_capture_seconds,
                  "kernel_warm_up_wait_s": engine.kernel_warm_up_seconds,
                  "long_prompt_warm_up_s": engine.long_prompt_warm_up_seconds,
                  "kv_cache_tokens": (engine.num_kv_blocks - 1) * engine.config.block_size,
                  "graph_memory_bytes": engine.runner.graph_memory_bytes,
                  "graph_memory_estimate": engine.runner.graph_memory._asdict() if engine.runner.graph_memory else None,
                  "engine_config": {k: str(v) for k, v in vars(engine.config).items()}, "results": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
