"""Each standard workload's result as a fraction of the card's floor (sageinfer/bench/floors.py): the
time the workload cannot go below at the measured ceilings, over the time it took.

  python benchmarks/fraction_of_ceilings.py --ceilings ceilings.json \
      fp8-kv8:quant-sageinfer-fp8-kv8.json fp8-kv8:quant-vllm-fp8-kv8.json

Each run is SCHEME:FILE, a result of ../shared/bench/engine_bench.py (benchmarks/gpu_quant_vs_vllm.sh)
or of benchmarks/run_standard.py, and the scheme it ran (floors.SCHEMES). Prints one markdown row per run and
workload.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.bench.floors import SCHEMES, ModelShape, fraction_of_floor, workload_floor  # noqa: E402
from sageinfer.bench.workloads import STANDARD_DIR, load_workloads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ceilings", required=True, help="benchmarks/ceilings.py's JSON")
    parser.add_argument("--model", default=os.path.join(STANDARD_DIR, "qwen3-8b"), help="the model's shapes")
    parser.add_argument("runs", nargs="+", help="SCHEME:FILE")
    args = parser.parse_args()
    with open(args.ceilings) as f:
        ceilings = json.load(f)
    with open(os.path.join(args.model, "config.json")) as f:
        shape = ModelShape.from_config(json.load(f))
    workloads = load_workloads()
    print("| run | workload | measured | floor | fraction of floor |")
    print("| --- | --- | --- | --- | --- |")
    for run in args.runs:
        scheme, path = run.split(":", 1)
        if scheme not in SCHEMES:
            raise SystemExit(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")
        with open(path) as f:
            result = json.load(f)
        name = f"{result.get('engine', 'sageinfer')} {scheme}"
        # engine_bench.py writes "workloads"; benchmarks/run_standard.py writes "results"
        for workload, measured in result.get("workloads", result.get("results", {})).items():
            floor = workload_floor(shape, scheme, ceilings, workloads[workload])
            frac = fraction_of_floor(floor, measured)
            if "seconds" in frac:
                print(f"| {name} | {workload} | {measured['seconds']:.2f} s | {floor['seconds']:.2f} s (prefill "
                      f"{floor['prefill_s']:.2f}, decode {floor['decode_s']:.2f}) | {100 * frac['seconds']:.0f}% |")
            else:
                print(f"| {name} | {workload} | TTFT {1e3 * measured['ttft_s']:.1f} ms, TPOT "
                      f"{1e3 * measured['tpot_s']:.2f} ms | {1e3 * floor['ttft_s']:.1f} ms, "
                      f"{1e3 * floor['tpot_s']:.2f} ms | TTFT {100 * frac['ttft_s']:.0f}%, "
                      f"TPOT {100 * frac['tpot_s']:.0f}% |")


if __name__ == "__main__":
    main()
