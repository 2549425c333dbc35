"""Batches of 4-bit matmuls past the tensor-core kernel's 32 rows: the whole weight expanded to bf16 then
the library GEMM (what the engine runs), against the weight expanded a chunk of output rows at a time into
one small buffer that every chunk and layer reuses (so the expanded bytes are written to and read from L2,
not HBM), one after the other ("chunk MB") or with the next chunk's expansion on a second stream beside the
current chunk's GEMM ("chunk2 MB"). Qwen3-8B's 36 layers, each with its own weights, in one CUDA graph.

  python benchmarks/experiments/time_int4_chunked.py [--rows 64,128,256,512] [--paths ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from sageinfer.ops.weight_only import (_int4_dequantize_kernel, chunked_expansion_matmul, dequantize,  # noqa: E402
                                       dequantize_kernel)
from time_int4_step import GROUP, LAYERS, SHAPES, SLICE, make_layer  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402


def expand_into(packed, scales, out):
    n = packed.shape[0]
    _int4_dequantize_kernel[(triton.cdiv(n, 16), out.shape[1] // (8 * SLICE))](
        packed, scales, scales, out, n, packed.stride(0), scales.stride(0), out.stride(0), GROUP=GROUP, SLICE=SLICE,
        BLOCK_N=16, HAS_ZERO=False)


def chunked(x, packed, scales, buffers, chunk_bytes, side):
    n, k = packed.shape[0], packed.shape[1] * 8
    step = max(128, chunk_bytes // (2 * k) // 128 * 128)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    starts = list(range(0, n, step))

    def view(i):
        rows = min(n, starts[i] + step) - starts[i]
        return buffers[i % len(buffers)][:rows * k].view(rows, k)

    def expand(i):
        n0 = starts[i]
        w = view(i)
        expand_into(packed[n0:n0 + w.shape[0]], scales[n0:n0 + w.shape[0]], w)

    if side is None:
        for i, n0 in enumerate(starts):
            expand(i)
            w = view(i)
            torch.mm(x, w.t(), out=y[:, n0:n0 + w.shape[0]])
        return y
    main = torch.cuda.current_stream()
    ready = [torch.cuda.Event() for _ in starts]
    done = [torch.cuda.Event() for _ in starts]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        expand(0)
        ready[0].record(side)
    for i, n0 in enumerate(starts):
        if i + 1 < len(starts):
            with torch.cuda.stream(side):
                if i >= 1:
                    side.wait_event(done[i - 1])  # its buffer's previous chunk multiplied
                expand(i + 1)
                ready[i + 1].record(side)
        main.wait_event(ready[i])
        w = view(i)
        torch.mm(x, w.t(), out=y[:, n0:n0 + w.shape[0]])
        done[i].record(main)
    main.wait_stream(side)
    return y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="64,256,512,2048")
    parser.add_argument("--paths", default="bf16,expand,chunk 8,chunk 16,chunk 32,chunk2 16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    # correctness of the chunked product against the expansion, once
    p, s, _, _ = make_layer(dev)["gate_up"]
    x = torch.randn(100, 4096, device=dev, dtype=dt)
    ref = torch.nn.functional.linear(x, dequantize_kernel(p, s, None, GROUP, dt, SLICE))
    bufs = [torch.empty(16 * 2**20 // 2, device=dev, dtype=dt) for _ in range(2)]
    side = torch.cuda.Stream()
    for stream in (None, side):
        got = chunked(x, p, s, bufs, 16 * 2**20, stream) if stream else chunked_expansion_matmul(
            x, p, s, None, GROUP, SLICE, bufs[0])
        torch.cuda.synchronize()
        print(f"chunked{' on two streams' if stream else ''}: largest difference to the expansion "
              f"{(got.float() - ref.float()).abs().max().item():.3g} (values up to {ref.abs().max().item():.3g})")
    assert torch.equal(dequantize_kernel(p[:256], s[:256], None, GROUP, torch.float32, SLICE),
                       dequantize(p[:256], s[:256], None, GROUP, torch.float32, SLICE))
    del p, s, x, ref
    layers = [make_layer(dev) for _ in range(LAYERS)]
    result = {}
    print("| rows | path | step's matmuls (ms) |")
    print("| --- | --- | --- |")
    for rows in (int(r) for r in args.rows.split(",")):
        xs = {name: torch.randn(rows, k, device=dev, dtype=dt) * 0.1 for name, (n, k) in SHAPES.items()}
        for path in args.paths.split(","):
            calls = []
            if path.startswith("chunk"):  # one pair of buffers for every layer: the same L2 lines
                kind, mb = path.split()
                nbytes = int(mb) * 2**20
                bufs = [torch.empty(nbytes // 2, device=dev, dtype=dt) for _ in range(2)]
                stream = side if kind == "chunk2" else None
            for layer in layers:
                for name, (packed, scales, _, dense) in layer.items():
                    x = xs[name]
                    if path == "bf16":
                        calls.append(lambda x=x, w=dense: torch.nn.functional.linear(x, w))
                    elif path == "expand":
                        calls.append(lambda x=x, p=packed, s=scales: torch.nn.functional.linear(
                            x, dequantize_kernel(p, s, None, GROUP, dt, SLICE)))
                    elif kind == "chunk":  # the engine's function
                        calls.append(lambda x=x, p=packed, s=scales, b=bufs[0]: chunked_expansion_matmul(
                            x, p, s, None, GROUP, SLICE, b))
                    else:
                        calls.append(lambda x=x, p=packed, s=scales, b=bufs, nb=nbytes, st=stream: chunked(
                            x, p, s, b, nb, st))
            try:
                t = graph_time(lambda: [fn() for fn in calls], reps=20)  # noqa: B023
            except Exception as exc:  # noqa: BLE001
                print(f"| {rows} | {path} | failed: {type(exc).__name__}: {exc} |", flush=True)
                continue
            result[f"{rows} {path}"] = t * 1e3
            print(f"| {rows} | {path} | {t * 1e3:.3f} |", flush=True)
            del calls
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
