"""A layer's four FP8 W8A8 matmuls (Qwen3-8B shapes) at several row counts on the GPU: the library path
(torch._scaled_mm with rowwise scales, through the platform) against Triton FP8 GEMMs in several tiles
and three forms: pointer loads with tokens as the MMA's rows, the same with weight rows as the MMA's rows
(tokens as its columns: "swap"), and tensor-descriptor (TMA) loads. Each path is captured in a CUDA graph
over distinct layers' weights and replayed; prints ms per layer, TB/s of weights and TFLOP/s, and checks
every path against the library's result.

  python benchmarks/experiments/time_fp8_gemm.py [--rows 64,200,492,2048,16000] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sageinfer.ops.int8_matmul import grouped_tile  # noqa: E402
from sageinfer.platforms import get_platform  # noqa: E402
from tune_decode_step import graph_time  # noqa: E402  (this folder: the same timing of one graph)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}


@triton.jit
def _scaled_store(acc, y_ptr, xs_ptr, ws_ptr, row_tile, col_tile, m, n, stride_y, BM: tl.constexpr,
                  BN: tl.constexpr, SWAP: tl.constexpr):
    """acc ([BM, BN], or [BN, BM] when SWAP) times both scales, stored into its tile of y."""
    rows = row_tile * BM + tl.arange(0, BM)
    cols = col_tile * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < m, cols < n
    xs = tl.load(xs_ptr + rows, mask=row_ok, other=0.0)
    ws = tl.load(ws_ptr + cols, mask=col_ok, other=0.0)
    if SWAP:
        y = acc * ws[:, None] * xs[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[None, :] * stride_y + cols[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & row_ok[None, :])
    else:
        y = acc * xs[:, None] * ws[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["m"])
def _fp8_kernel(x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, m, n, k, stride_x, stride_w, stride_y,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, SWAP: tl.constexpr):
    row_tile, col_tile = grouped_tile(tl.program_id(0), m, n, BM, BN, GROUP)
    rows = row_tile * BM + tl.arange(0, BM)
    cols = col_tile * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64) * stride_x
    w_rows = w_ptr + cols.to(tl.int64) * stride_w
    acc = tl.zeros([BN, BM] if SWAP else [BM, BN], dtype=tl.float32)
    for start in range(0, k, BK):
        if SWAP:  # weight rows as the MMA's rows
            w = tl.load(w_rows[:, None] + (start + ks)[None, :], mask=(cols < n)[:, None], other=0.0)
            x = tl.load(x_rows[None, :] + (start + ks)[:, None], mask=(rows < m)[None, :], other=0.0)
            acc = tl.dot(w, x, acc)
        else:
            x = tl.load(x_rows[:, None] + (start + ks)[None, :], mask=(rows < m)[:, None], other=0.0)
            w = tl.load(w_rows[None, :] + (start + ks)[:, None], mask=(cols < n)[None, :], other=0.0)
            acc = tl.dot(x, w, acc)
    _scaled_store(acc, y_ptr, xs_ptr, ws_ptr, row_tile, col_tile, m, n, stride_y, BM, BN, SWAP)


@triton.jit(do_not_specialize=["m"])
def _fp8_tma_kernel(x_desc, w_desc, y_ptr, xs_ptr, ws_ptr, m, n, k, stride_y,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, SWAP: tl.constexpr):
    row_tile, col_tile = grouped_tile(tl.program_id(0), m, n, BM, BN, GROUP)
    acc = tl.zeros([BN, BM] if SWAP else [BM, BN], dtype=tl.float32)
    for start in range(0, k, BK):
        x = x_desc.load([row_tile * BM, start])
        w = w_desc.load([col_tile * BN, start])
        if SWAP:
            acc = tl.dot(w, x.T, acc)
        else:
            acc = tl.dot(x, w.T, acc)
    _scaled_store(acc, y_ptr, xs_ptr, ws_ptr, row_tile, col_tile, m, n, stride_y, BM, BN, SWAP)


def triton_fp8(xq, xs, wq, ws, cfg):
    kind, bm, bn, bk, warps, stages = cfg
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    swap = kind.endswith("swap")
    if kind.startswith("tma"):
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor.from_tensor(xq, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(wq, [bn, bk])
        _fp8_tma_kernel[grid](x_desc, w_desc, y, xs, ws, m, n, k, y.stride(0), BM=bm, BN=bn, BK=bk, GROUP=8,
                              SWAP=swap, num_warps=warps, num_stages=stages)
    else:
        _fp8_kernel[grid](xq, wq, y, xs, ws, m, n, k, xq.stride(0), wq.stride(0), y.stride(0), BM=bm, BN=bn, BK=bk,
                          GROUP=8, SWAP=swap, num_warps=warps, num_stages=stages)
    return y


def candidates(m: int) -> list[tuple]:
    out = []
    for kind in ("ptr", "ptr-swap", "tma", "tma-swap"):
        swap = kind.endswith("swap")
        for bm in (16, 32, 64, 128, 256) if swap else (64, 128, 256):
            if bm > 2 * max(m, 16) or (swap and bm < 32 and m > 128):
                continue
            for bn in (64, 128, 256) if not swap else (64, 128):
                if bm * bn > 128 * 256:
                    continue
                for bk, warps, stages in ((128, 4, 4), (128, 8, 3)):
                    if bm * bn >= 128 * 256 and warps == 4:
                        continue
                    out.append((kind, bm, bn, bk, warps, stages))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="64,128,200,256,492,1024,2048,16000")
    parser.add_argument("--out")
    args = parser.parse_args()

    def alloc(size, alignment, stream):  # device-side descriptors' scratch (unused by host descriptors)
        return torch.empty(size, device="cuda", dtype=torch.int8)
    triton.set_allocator(alloc)
    dev, platform = "cuda", get_platform()
    result = {"device": torch.cuda.get_device_name(), "rows": {}}
    weight_bytes = sum(n * k for n, k in SHAPES.values())
    for m in (int(r) for r in args.rows.split(",")):
        layers = 36 if m <= 1024 else 2
        weights = [{name: ((torch.randn(n, k, device=dev) * 0.05).to(torch.float8_e4m3fn),
                           torch.rand(n, device=dev) * 0.01 + 1e-3) for name, (n, k) in SHAPES.items()}
                   for _ in range(layers)]
        inputs = {name: (torch.randn(m, k, device=dev).to(torch.float8_e4m3fn), torch.rand(m, 1, device=dev) * 0.01)
                  for name, (n, k) in SHAPES.items()}

        def run(path, keep=None):
            for layer in weights:
                for name, (wq, ws) in layer.items():
                    xq, xs = inputs[name]
                    if path == "library":
                        y = platform.fp8_scaled_matmul(xq, wq, xs, ws, torch.bfloat16)
                    else:
                        y = triton_fp8(xq, xs, wq, ws, path)
                    if keep is not None:
                        keep[name] = y
        reference = {}
        run("library", reference)
        flops = 2 * m * weight_bytes
        rows, best, best_seconds = {}, None, 0.0
        for path in ["library", *candidates(m)]:
            got = {}
            try:
                run(path, got)
                err = max(float(((got[n].float() - reference[n].float()).norm() / reference[n].float().norm()))
                          for n in SHAPES)
                seconds = graph_time(lambda p=path: run(p), reps=5 if m > 1024 else 20) / layers
            except Exception as exc:  # a tile that does not fit the shared memory
                print(f"rows {m} {path}: {type(exc).__name__} {str(exc)[:100]}", flush=True)
                continue
            label = path if path == "library" else "-".join(map(str, path))
            rows[label] = {"ms_per_layer": seconds * 1e3, "tbps": weight_bytes / seconds / 1e12,
                           "tflops": flops / seconds / 1e12, "rel_err": err}
            if err > 2e-2:
                print(f"rows {m} {label}: WRONG err {err:.1e}", flush=True)
                continue
            if path != "library" and (best is None or seconds < best_seconds):
                best, best_seconds = path, seconds
        lib = rows["library"]["ms_per_layer"]
        ranked = sorted((v["ms_per_layer"], k) for k, v in rows.items() if v["rel_err"] <= 2e-2)
        for ms, label in ranked[:8]:
            v = rows[label]
            print(f"rows {m:>6} {label:<24} {ms:8.4f} ms/layer {v['tbps']:5.2f} TB/s {v['tflops']:6.0f} TFLOP/s "
                  f"x{lib / ms:5.2f} of library", flush=True)
        # per-shape timing of the best against the library
        if best is not None:
            for name in SHAPES:
                per = {}
                for path in ("library", best):
                    def one(p=path, name=name):
                        for layer in weights:
                            wq, ws = layer[name]
                            xq, xs = inputs[name]
                            if p == "library":
                                platform.fp8_scaled_matmul(xq, wq, xs, ws, torch.bfloat16)
                            else:
                                triton_fp8(xq, xs, wq, ws, p)
                    per["library" if path == "library" else "best"] = graph_time(one, reps=10) / layers * 1e6
                print(f"rows {m:>6}   {name:<8} library {per['library']:7.1f} us  best {per['best']:7.1f} us",
                      flush=True)
                rows.setdefault("per_shape_us", {})[name] = per
        result["rows"][m] = rows
        del weights, inputs
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
