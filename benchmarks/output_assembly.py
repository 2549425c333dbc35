"""The front end's cost of rebuilding outputs from the engine core's differences (CPU only): R requests
each get one token a step for T steps through engine.core_messages.OutputAssembler, as the receiver
thread of `sageinfer serve` does; prints milliseconds per step as the outputs grow.

  python benchmarks/output_assembly.py --requests 256 --tokens 8192
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.engine import core_messages as msg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    assembler = msg.OutputAssembler()
    for r in range(args.requests):
        assembler.start(str(r), None, [1] * 100, 1)
    window_start, window_first, report_at = time.perf_counter(), 0, 1024
    for step in tqdm(range(args.tokens), desc="steps"):
        finished = step == args.tokens - 1
        for r in range(args.requests):
            completion = msg.CompletionDelta(0, 4 * step, " tok", [step], None, None, "length" if finished else None,
                                             None)
            assembler.apply(msg.OutputDelta(str(r), [completion], finished, 0, None, None))
        if step + 1 == report_at or finished:  # the steps since the last report, outputs doubled in length
            now, steps = time.perf_counter(), step + 1 - window_first
            tqdm.write(f"outputs of {step + 1} tokens: {(now - window_start) / steps * 1e3:.2f} ms a step "
                       f"for {args.requests} requests (the last {steps} steps)")
            window_start, window_first, report_at = now, step + 1, report_at * 2

if __name__ == "__main__":
    main()
