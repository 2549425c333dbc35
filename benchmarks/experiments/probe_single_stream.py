"""Single-stream decode (the L1 workload) with and without the one-row decode fusions, each variant in
its own engine (graphs are captured with the fusions baked in).

  python benchmarks/experiments/probe_single_stream.py --variant fused          # the default path
  python benchmarks/experiments/probe_single_stream.py --variant norm-kernels   # residual add + RMSNorm launched apart
  python benchmarks/experiments/probe_single_stream.py --variant rotary-kernel  # rotary + cache write launched apart
  python benchmarks/experiments/probe_single_stream.py --variant unfused        # both launched apart
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer import LLM  # noqa: E402
from sageinfer.bench.runs import run_latency  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR, load_workloads  # noqa: E402
import sageinfer.attention.triton_backend as triton_backend  # noqa: E402
import sageinfer.models.llama as llama  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="fused", choices=["fused", "norm-kernels", "rotary-kernel", "unfused"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.variant in ("norm-kernels", "unfused"):
        llama.one_row = lambda x, use_triton: False  # the model takes the layer-by-layer path
    if args.variant in ("rotary-kernel", "unfused"):
        triton_backend.ROTARY_IN_DECODE_ATTENTION = False
    llm = LLM(os.path.join(STANDARD_DIR, "qwen3-8b"), load_format="dummy", skip_tokenizer_init=True,
              max_num_seqs=1, show_progress=False)
    workload = dict(load_workloads()["L1-single-stream"], repeats=args.repeats)
    r = run_latency(llm, workload)
    print(json.dumps({"variant": args.variant, "tpot_ms": 1e3 * r["tpot_s"], "ttft_ms": 1e3 * r["ttft_s"],
                      "e2e_all_s": r["e2e_all"]}), flush=True)


if __name__ == "__main__":
    main()
