"""Start-up compiles of the quantized linear layers' own Triton kernels for small batches (the 4-bit and
FP4 tensor-core matmul, the 8-bit weight-only kernel), from several threads beside the memory profile,
as attention/kernel_warm_up.py does for attention. Left to the decode graphs' capture, they compiled
one after another: a variant of the FP4 tensor-core matmul takes about 20 s to compile for sm_90 on
one core, and an NVFP4 Qwen3-8B took 100 s to start on an H200 where bf16 took 20 s
(benchmarks/results/2026-12-03d-h200-quant-vs-vllm.md). Compiles run in parallel from threads
(Triton's passes and ptxas run outside the GIL: two variants in 16.5 s against 27.9 s one after the
other on a 2-core machine)."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch import nn

from sageinfer.background_warm_up import in_background


def linear_warm_up_calls(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[Callable[[], None]]:
    """One call per distinct quantized layer (its method and its tensors' shapes and dtypes): the layer's
    matmul on zeros at every row count from 2 to what its method runs on kernels of its own
    (quant.kernel_rows: 32 or 64), on its own kernels only (no bias, no all-reduce). Every count, not a
    few: a kernel's tile, its split over K and the specialisation of the row count follow the rows, and
    the repeats of a variant are launches of a compiled kernel."""
    calls, seen = [], set()
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if quant is None or not getattr(module, "use_triton", False) or not hasattr(quant, "kernel_rows"):
            continue
        rows = list(range(2, quant.kernel_rows(module) + 1))
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        key = (type(quant), tuple((name, tuple(t.shape), t.dtype) for name, t in tensors if name != "bias"))
        if rows and key not in seen:
            seen.add(key)
            calls.append(functools.partial(_matmuls, module, rows, dtype, device))
    return calls


@torch.no_grad()
def _matmuls(layer: nn.Module, rows: list[int], dtype: torch.dtype, device: torch.device) -> None:
    for n in rows:
        layer.quant.apply(layer, torch.zeros(n, layer.local_shape[1], dtype=dtype, device=device))


def start_linear_warm_up(calls: list[Callable[[], None]], threads: int,
                         enter_thread=lambda: None) -> Callable[[bool], None]:
    """Run calls in a pool of `threads` from a thread of their own; the finish() returned waits for
    them, raises their first error and runs each once more from the caller's thread (where its
    kernels are now compiled). finish(cancel=True): calls not yet begun are skipped, nothing raised.
    The calls launch on the device's default stream, as the engine's steps do before the graphs: the
    split-K counts (ops/split_k.py) are never used by two launches at once."""

    def work(cancelled):
        def one(call):
            if not cancelled.is_set():
                enter_thread()
                call()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(one, calls))

    def again():
        for call in calls:
            call()
    return in_background(work, again, "linear-warm-up", enter_thread)
