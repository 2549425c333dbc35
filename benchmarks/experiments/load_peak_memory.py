"""The device memory a load takes at its peak, against the weights it ends with: a full-precision model quantized at
load time (dummy weights through the checkpoint path, or a real checkpoint). One process a run.

  python benchmarks/experiments/load_peak_memory.py --model sageinfer/bench/standard/qwen3-32b --quantization fp8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.attention.backend import get_attention_backend  # noqa: E402
from sageinfer.models.loader import load_model  # noqa: E402
from sageinfer.models.model_config import load_model_config  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--load-format", default="dummy")
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = load_model_config(args.model)
    started = time.perf_counter()
    with get_platform("cuda").loading_allocations():  # as the engine loads
        model = load_model(cfg, args.model, args.load_format, torch.bfloat16, device, get_attention_backend("triton"),
                           show_progress=False, quantization=args.quantization)
    torch.cuda.synchronize()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(f"{os.path.basename(args.model)} quantization={args.quantization}: load {time.perf_counter() - started:.1f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, held after {held / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
