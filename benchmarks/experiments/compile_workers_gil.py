"""What start-up's compiles take from the thread that loads the weights, in threads or in compile workers
(ops/compile_workers.py), without a GPU: nine engine kernels (sass_loop's cases: decode and prefill attention
over each cache dtype, the one-row GEMVs, the 4-bit kernels) are compiled for sm_90 from --threads threads
into an empty Triton cache, while the main thread runs a Python loop, a stand-in for the load (which is
Python between its copies). Each arm runs in a process of its own with a cache of its own.

  python benchmarks/experiments/compile_workers_gil.py [--threads 2] [--workers 2]

Prints each arm's compile wall time and the loop's speed against the loop alone. A GPU machine's start-up
(benchmarks/startup_compiles.py with SAGEINFER_COMPILE_WORKERS=0 and unset) is the measure that counts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(__file__)


def _loop_rate(stop: threading.Event) -> float:
    """Python loop trips a second until stop is set."""
    trips, start = 0, time.perf_counter()
    while not stop.is_set():
        sum(range(200))
        trips += 1
    return trips / (time.perf_counter() - start)


def _arm(threads: int, workers: int) -> dict:
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "..", ".."))
    import sass_loop  # (sets TRITON_INTERPRET=0 before triton loads)
    from concurrent.futures import ThreadPoolExecutor
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from sageinfer.ops.compile_workers import CompileWorkers

    class Sm90Driver:  # names the device, its stream and its target; loads nothing
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def case(**kw):
        return argparse.Namespace(**{**dict(kv="bf16", weights="bf16", rows=16, norm=False, half_sums="off",
                                            min_programs=0, ahead=1, fp4=None, elements=False, group=0), **kw})
    calls = [make(args)[2] for make, args in [
        (sass_loop.decode_attention, case(kv="bf16")), (sass_loop.decode_attention, case(kv="fp8")),
        (sass_loop.decode_attention, case(kv="int8")), (sass_loop.prefill_attention, case()),
        (sass_loop.prefill_attention, case(kv="fp8")), (sass_loop.gemv, case(weights="fp8")),
        (sass_loop.int4_gemv, case(norm=True)), (sass_loop.int4_mma, case()), (sass_loop.fp8_block_matmul, case())]]

    def launch(call):
        try:
            call()
        except AttributeError:  # compiled; the stand-in driver cannot load it
            pass

    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    idle_rate = _loop_rate(stop)
    driver.set_active(Sm90Driver())
    pool = CompileWorkers(workers) if workers else None
    stop.clear()
    done = {}

    def compile_all():
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as executor:
            list(executor.map(launch, calls))
        done["seconds"] = time.perf_counter() - start
        stop.set()
    thread = threading.Thread(target=compile_all)
    thread.start()
    busy_rate = _loop_rate(stop)
    thread.join()
    if pool is not None:
        pool.close()
    return {"threads": threads, "workers": workers, "compile_wall_s": round(done["seconds"], 2),
            "loop_speed": round(busy_rate / idle_rate, 3),
            "worker_compiled": pool.compiled if pool else 0, "cache_entries": len(os.listdir(
                os.environ["TRITON_CACHE_DIR"]))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # a child's worker count
    args = parser.parse_args()
    if args.arm is not None:
        print(json.dumps(_arm(args.threads, args.arm)))
        return
    for workers in (0, args.workers):
        with tempfile.TemporaryDirectory() as cache:
            run = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--arm", str(workers)],
                                 env=dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_INTERPRET="0"),
                                 capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        where = f"{workers} workers" if workers else "in the threads"
        print(f"compiles {where:14s} ({result['threads']} threads): {result['compile_wall_s']:6.2f} s wall; "
              f"the Python loop at {result['loop_speed']:.0%} of its speed alone; "
              f"{result['worker_compiled']} compiled by workers, {result['cache_entries']} cache entries", flush=True)


if __name__ == "__main__":
    main()
