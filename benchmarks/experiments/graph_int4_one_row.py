"""The one-row 4-bit matmuls as a decode step runs them: 36 layers' distinct weights (no layer finds its
words in L2), every call in a CUDA graph (no launch cost on the host), on the GPU:

  python benchmarks/experiments/graph_int4_one_row.py [--out result.json] [--sweep]
  python benchmarks/experiments/graph_int4_one_row.py --eager gate_up   # a few plain launches, for ncu
  python benchmarks/experiments/graph_int4_one_row.py --down-plain      # down without SiLU-and-mul in it
  python benchmarks/experiments/graph_int4_one_row.py --down-plain --half-sums   # also the fp16-pair loop
  python benchmarks/experiments/graph_int4_one_row.py --down-plain --fp4         # also FP4 words (NVFP4, MXFP4)

Per kernel: microseconds a call per layer kind (a graph of its 36 calls) and the step's 144 calls in
one graph, with the bytes read over that time. Beside them: bf16 weights through the skinny kernel and
a kernel that only reads the words (the card's reading speed at these sizes). Each 4-bit kernel is
first checked against the dequantized weights on one layer.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tune_int4_gemv import GROUP, LAYERS, SHAPES, make, rel_err, step_call  # noqa: E402

from sageinfer.ops import gemv_int4  # noqa: E402
from sageinfer.ops.gemv import gemv  # noqa: E402
from sageinfer.ops.gemv_int4 import INT4_GEMV_CONFIG, int4_gemv  # noqa: E402


def compiled(jit_fn) -> list:
    """(registers, spilled) of each variant of a kernel compiled so far in this process."""
    found = []
    try:
        for caches in jit_fn.device_caches.values():
            found += [(k.n_regs, k.n_spills) for k in caches[0].values()]
    except (AttributeError, IndexError, TypeError):  # another Triton's cache layout
        pass
    return found


@triton.jit
def _read_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    """Reads its words and stores one sum: what reading alone costs."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n_words, step):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def graph_us(calls, reps: int = 20) -> float:
    """Microseconds a replay of a graph of calls (each a no-argument function)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # compiled and warm before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true", help="also the pair kernel's tiles and split targets")
    parser.add_argument("--eager", default=None, choices=list(SHAPES), help="only launch this layer a few times")
    parser.add_argument("--half-sums", action="store_true",
                        help="also the fp32 loop, and the fp16-pair loop (half_sums, NVIDIA's packed "
                        "instructions) with one or two runs of words in flight")
    parser.add_argument("--tiles", action="store_true",
                        help="the fp16-pair loop at 256 weights a thread a trip beside today's 128 (block_n / warps; "
                             "sm_90 counts: benchmarks/results/2026-12-05i-cpu-modelopt-autoround-int8.md)")
    parser.add_argument("--fp4", action="store_true",
                        help="also FP4 e2m1 words with NVFP4's scale bytes (groups of 16) and MXFP4's (32), in "
                        "NVIDIA's packed instructions and in plain Triton")
    parser.add_argument("--down-plain", action="store_true",
                        help="down's input already activated (what forming SiLU(gate) * up in every program costs)")
    args = parser.parse_args()
    if args.fp4 and not args.down_plain:
        parser.error("--fp4 takes --down-plain (FP4 layers take a plain input)")
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    words = {name: [torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev) for _ in range(LAYERS)]
             for name, (n, k) in SHAPES.items()}
    scales = {name: [(torch.rand(n, k // GROUP, device=dev) * 0.002 + 0.0005).to(dt) for _ in range(LAYERS)]
              for name, (n, k) in SHAPES.items()}
    calls = {name: step_call(name, 1, k, dev, dt) for name, (n, k) in SHAPES.items()}
    if args.down_plain:
        n, k = SHAPES["down"]
        calls["down"] = (torch.randn(1, k, device=dev, dtype=dt), {"residual": torch.zeros(1, n, device=dev, dtype=dt)})
    outs = {name: torch.empty(1, n, device=dev, dtype=dt) for name, (n, k) in SHAPES.items()}

    def default_kernel(name, i):
        x, kw = calls[name]
        return lambda: gemv(x, words[name][i], weight_scale=scales[name][i], int4=True, slice_width=128, **kw)

    def configured_kernel(cfg):
        def call(name, i):
            x, kw = calls[name]
            y = kw["residual"] if "residual" in kw else outs[name]
            return lambda: int4_gemv(x, words[name][i], scales[name][i], None, GROUP, 128, y, None,
                                     kw.get("gated", False), kw.get("norm_weight"), kw.get("eps", 0.0),
                                     "residual" in kw, cfg)
        return call

    if args.eager:
        for i in range(5):
            default_kernel(args.eager, i)()
        torch.cuda.synchronize()
        return

    # Correctness on one layer against the dequantized weights (tune_int4_gemv's layers).
    checked = {}
    for name, (n, k) in SHAPES.items():
        packed, sc, _, dense = make(n, k, 128, dev)
        x, kw = calls[name]
        fresh = {key: (v.clone() if key == "residual" else v) for key, v in kw.items()}
        ref = gemv(x, dense, **fresh)
        fresh = {key: (v.clone() if key == "residual" else v) for key, v in kw.items()}
        checked[name] = rel_err(gemv(x, packed, weight_scale=sc, int4=True, slice_width=128, **fresh), ref)
        if args.half_sums and not kw.get("gated"):
            for ptx in (True, False):
                fresh = {key: (v.clone() if key == "residual" else v) for key, v in kw.items()}
                half = dict(INT4_GEMV_CONFIG, half_sums=True, ptx=ptx)
                checked[f"{name} half sums{' ptx' if ptx else ''}"] = rel_err(
                    gemv(x, packed, weight_scale=sc, int4=True, slice_width=128, config=half, **fresh), ref)
        del packed, sc, dense
    print("error against dequantized weights:", checked, flush=True)

    word_bytes = {name: n * k // 2 + n * (k // GROUP) * 2 for name, (n, k) in SHAPES.items()}
    result = {"checked": checked, "kernels": {}}

    def measure(label, call, kernel=None):
        seen = len(compiled(kernel)) if kernel else 0
        per_kind = {name: graph_us([call(name, i) for i in range(LAYERS)]) / LAYERS for name in SHAPES}
        step = graph_us([call(name, i) for i in range(LAYERS) for name in SHAPES])
        gbs = {name: word_bytes[name] / per_kind[name] / 1e3 for name in SHAPES}
        step_tb = sum(word_bytes.values()) * LAYERS / step / 1e6
        regs = sorted(set(compiled(kernel)[seen:])) if kernel else []
        result["kernels"][label] = {"us": per_kind, "GB_s": gbs, "step_us": step, "step_TB_s": step_tb,
                                    "registers_spills": regs}
        print(f"{label:48s} regs {regs} " + " ".join(f"{k} {v:6.1f}us {gbs[k]:5.0f}GB/s" for k, v in per_kind.items())
              + f" | step {step / 1e3:.3f} ms {step_tb:.2f} TB/s", flush=True)

    def read_only(name, i):
        w = words[name][i]
        out = torch.empty(1024, dtype=torch.int32, device=dev)
        return lambda: _read_kernel[(528,)](w, out, w.numel(), BLOCK=1024, num_warps=4)

    measure("read the words only (528 programs)", read_only)
    measure("engine default", default_kernel, gemv_int4._int4_gemv_kernel)
    if args.half_sums:
        for half, ahead in ((False, 1), (True, 1), (True, 2)):
            cfg = dict(INT4_GEMV_CONFIG, half_sums=half, ptx=True, ahead=ahead)
            measure(f"{'half sums ptx' if half else 'fp32'} ahead {ahead}",
                    configured_kernel(cfg), gemv_int4._int4_gemv_kernel)
    if args.tiles:
        for block_n, warps, ahead in ((32, 8, 2), (32, 8, 1), (64, 8, 1), (32, 4, 1), (16, 2, 1)):
            cfg = dict(INT4_GEMV_CONFIG, half_sums=True, ptx=True, ahead=ahead, block_n=block_n, num_warps=warps)
            measure(f"half sums ptx block_n {block_n} x {warps} warps ahead {ahead}",
                    configured_kernel(cfg), gemv_int4._int4_gemv_kernel)
    if args.fp4:
        for kind, group in (("e4m3", 16), ("e8m0", 32)):
            fp4_scales = {name: [torch.randint(100, 120, (n, k // group), dtype=torch.uint8, device=dev)
                                 for _ in range(LAYERS)] for name, (n, k) in SHAPES.items()}
            row_scale = {name: torch.full((n,), 1e-3, device=dev) for name, (n, k) in SHAPES.items()}

            def fp4_call(cfg, kind=kind, group=group, fp4_scales=fp4_scales, row_scale=row_scale):
                def call(name, i):
                    x, kw = calls[name]
                    y = kw["residual"] if "residual" in kw else outs[name]
                    return lambda: int4_gemv(x, words[name][i], fp4_scales[name][i], None, group, 128, y, None,
                                             False, kw.get("norm_weight"), kw.get("eps", 0.0), "residual" in kw, cfg,
                                             fp4=kind, row_scale=row_scale[name])
                return call
            for ptx, ahead in ((True, 2), (True, 1), (False, 2)):
                cfg = dict(INT4_GEMV_CONFIG, ptx=ptx, ahead=ahead)
                measure(f"fp4 {kind} {'ptx' if ptx else 'triton'} ahead {ahead}", fp4_call(cfg),
                        gemv_int4._int4_gemv_kernel)
            del fp4_scales
    if args.sweep:
        for bn, warps, stages, programs in itertools.product((16, 32, 64), (4, 8), (1, 2), (0, 528)):
            cfg = dict(INT4_GEMV_CONFIG, block_n=bn, num_warps=warps, num_stages=stages, min_programs=programs)
            try:
                measure(f"fp32 {cfg}", configured_kernel(cfg), gemv_int4._int4_gemv_kernel)
            except Exception as exc:  # noqa: BLE001  (resources exceeded for this tile)
                print(cfg, "failed", type(exc).__name__, str(exc)[:200], flush=True)
    words.clear()  # room for the bf16 weights
    torch.cuda.empty_cache()
    dense = {name: [torch.randn(n, k, device=dev, dtype=dt) * 0.01 for _ in range(LAYERS)] for name, (n, k) in SHAPES.items()}
    bf16_bytes = {name: n * k * 2 for name, (n, k) in SHAPES.items()}

    def bf16(name, i):
        x, kw = calls[name]
        return lambda: gemv(x, dense[name][i], **kw)
    per_kind = {name: graph_us([bf16(name, i) for i in range(LAYERS)]) / LAYERS for name in SHAPES}
    step = graph_us([bf16(name, i) for i in range(LAYERS) for name in SHAPES])
    result["kernels"]["bf16 skinny kernel"] = {"us": per_kind, "step_us": step,
                                               "step_TB_s": sum(bf16_bytes.values()) * LAYERS / step / 1e6}
    print(f"{'bf16 skinny kernel':48s} " + " ".join(f"{k} {v:6.1f}us {bf16_bytes[k] / v / 1e3:5.0f}GB/s"
                                                   for k, v in per_kind.items())
          + f" | step {step / 1e3:.3f} ms {sum(bf16_bytes.values()) * LAYERS / step / 1e6:.2f} TB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
