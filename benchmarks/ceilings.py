"""The card's ceilings, measured: what its matmul kernels reach per operand type on a large square
product, and its device copy bandwidth. The quantized workloads' tables divide by these
(sageinfer/bench/floors.py, benchmarks/fraction_of_ceilings.py).

  python benchmarks/ceilings.py --out ceilings.json [--size 8192]

Matmuls (n x n x n, CUDA events, median of --repeats after warm-up):
  bf16_matmul_tflops      torch.matmul on bf16
  fp8_matmul_tflops       torch._scaled_mm, e4m3, a scale per row of each operand (the engine's FP8 GEMM)
  fp8_tensorwise_tflops   the same with one scale per operand (the library's fastest FP8 form)
  int8_library_tops       torch._int_mm (int32 out, no scales)
  int8_triton_tops        ops/int8_matmul.py with its scales (the engine's INT8 GEMM on Hopper)
  int8_triton_tma_tops    the same tiles in its descriptor kernel, one persistent program an SM
  int8_matmul_tops        the fastest of the INT8 rows
copy_bandwidth_gbs: a 4 GiB device-to-device copy, bytes read plus bytes written per second.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from provenance import source_version  # noqa: E402
from sageinfer.ops.int8_matmul import fast_config, int8_matmul  # noqa: E402


def median_seconds(fn, repeats: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_ceilings(n: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    rate = {}
    rate["bf16_matmul_tflops"] = 2 * n ** 3 / median_seconds(lambda: a @ b, repeats) / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    rows, cols = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    one = torch.ones((), device="cuda")
    rate["fp8_matmul_tflops"] = 2 * n ** 3 / median_seconds(lambda: torch._scaled_mm(
        a8, b8.t(), scale_a=rows, scale_b=cols, out_dtype=torch.bfloat16), repeats) / 1e12
    rate["fp8_tensorwise_tflops"] = 2 * n ** 3 / median_seconds(lambda: torch._scaled_mm(
        a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), repeats) / 1e12
    del a8, b8
    ai = torch.randint(-127, 128, (n, n), device="cuda", generator=gen, dtype=torch.int8)
    bi = torch.randint(-127, 128, (n, n), device="cuda", generator=gen, dtype=torch.int8)
    rate["int8_library_tops"] = 2 * n ** 3 / median_seconds(lambda: torch._int_mm(ai, bi.t()), repeats) / 1e12
    x_scale, w_scale = torch.ones(n, 1, device="cuda"), torch.ones(n, device="cuda")
    rate["int8_triton_tops"] = 2 * n ** 3 / median_seconds(lambda: int8_matmul(
        ai, x_scale, bi, w_scale, torch.bfloat16, fast_config(n)), repeats) / 1e12
    # the same tiles through the descriptor kernel, one persistent program an SM
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rate["int8_triton_tma_tops"] = 2 * n ** 3 / median_seconds(lambda: int8_matmul(
        ai, x_scale, bi, w_scale, torch.bfloat16, {**fast_config(n), "programs": sms}), repeats) / 1e12
    rate["int8_matmul_tops"] = max(rate["int8_library_tops"], rate["int8_triton_tops"], rate["int8_triton_tma_tops"])
    return rate


def copy_bandwidth_gbs(repeats: int) -> float:
    x = torch.empty(2 ** 31, device="cuda", dtype=torch.bfloat16)  # 4 GiB
    y = torch.empty_like(x)
    seconds = median_seconds(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * x.element_size() / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    record = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), **source_version(),
              "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "size": args.size, **matmul_ceilings(args.size, args.repeats),
              "copy_bandwidth_gbs": copy_bandwidth_gbs(args.repeats)}
    for key, value in record.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
