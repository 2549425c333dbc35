"""The norm and activation kernels that write a W8A8 layer's 8-bit input (ops/quantize_fused.py) against
the 16-bit kernels followed by the per-row quantization (Qwen3-8B widths, bf16, FP8), each captured in a
CUDA graph over 36 layers' worth of launches and replayed. Prints us per layer (two norms, one activation).

  python benchmarks/experiments/time_fused_quantize.py [--rows 64,200,492,2048,16384]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.activation import silu_and_mul  # noqa: E402
from sageinfer.ops.quantize import quantize_rows_kernel  # noqa: E402
from sageinfer.ops.quantize_fused import rms_norm_quantize, silu_and_mul_quantize  # noqa: E402
from sageinfer.ops.rms_norm import rms_norm  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS = 4096, 12288, 36


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="64,200,492,2048,16384")
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        residual = torch.randn(m, HIDDEN, device=dev, dtype=dt)
        weight = torch.rand(HIDDEN, device=dev, dtype=dt) + 0.5
        gate_up = torch.randn(m, 2 * INTERMEDIATE, device=dev, dtype=dt)
        layers = LAYERS if m <= 2048 else 4

        def unfused():
            for _ in range(layers):
                for _ in range(2):
                    normed, _ = rms_norm(x, weight, 1e-6, residual)
                    quantize_rows_kernel(normed, "fp8", 448.0)
                quantize_rows_kernel(silu_and_mul(gate_up), "fp8", 448.0)

        def fused():
            for _ in range(layers):
                for _ in range(2):
                    rms_norm_quantize(x, weight, 1e-6, "fp8", 448.0, residual)
                silu_and_mul_quantize(gate_up, "fp8", 448.0)
        t_unfused = graph_time(unfused) / layers * 1e6
        t_fused = graph_time(fused) / layers * 1e6
        print(f"rows {m:>6}: unfused {t_unfused:8.1f} us/layer  fused {t_fused:8.1f} us/layer  "
              f"x{t_unfused / t_fused:.2f}", flush=True)
        del x, residual, gate_up
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
