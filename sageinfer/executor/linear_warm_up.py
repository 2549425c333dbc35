"""Start-up compiles of the quantized linear layers' own Triton kernels for small batches (the 4-bit and
FP4 tensor-core matmul, the 8-bit weight-only kernel) and of the one-row path's, from several threads beside
the memory profile, as attention/kernel_warm_up.py does for attention. Left to the decode graphs' capture, they compiled
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
from sageinfer.distributed.parallel_state import get_tp_group


def linear_warm_up_calls(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[Callable[[], None]]:
    """One call per distinct quantized layer (its method and its tensors' shapes and dtypes): the layer's
    matmul on zeros at every row count from 2 to what its method runs on kernels of its own
    (quant.kernel_rows: 32 or 64), and at the counts of quant.extra_warm_up_rows, where a method has more tile
    kinds, on its own kernels only (no bias, no all-reduce). Every count, not a
    few: a kernel's tile, its split over K and the specialisation of the row count follow the rows, and
    the repeats of a variant are launches of a compiled kernel."""
    calls, seen = [], set()
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if quant is None or not getattr(module, "use_triton", False) or not hasattr(quant, "kernel_rows"):
            continue
        rows = list(range(2, quant.kernel_rows(module) + 1))
        if rows and hasattr(quant, "extra_warm_up_rows"):
            rows += quant.extra_warm_up_rows(module)
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        key = (type(quant), tuple((name, tuple(t.shape), t.dtype) for name, t in tensors if name != "bias"))
        if rows and key not in seen:
            seen.add(key)
            calls.append(functools.partial(_matmuls, module, rows, dtype, device))
    return calls


def one_row_warm_up_calls(model: nn.Module, dtype: torch.dtype, device: torch.device) -> list[Callable[[], None]]:
    """The one-row path's kernels (single-stream decode: the matmuls with the norms, activation and residual
    adds folded into them, then the LM head), for one decoder layer: every layer has its shapes. Left to the
    first decode graph's capture, they compiled in the start-up's own thread (4 variants of the bf16 one-row
    matmul, 1.7 s of an 8B start on an H100, 2026-12-05e). Not with tensor parallelism, where the one-row path
    all-reduces: no collective may run beside the caller's."""
    layer = next((m for m in model.modules() if hasattr(m, "one_row_matmuls")), None)
    if layer is None or get_tp_group().size != 1:
        return []
    return [functools.partial(_one_row, model, layer, dtype, device)]


@torch.no_grad()
def _one_row(model: nn.Module, layer: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    residual = torch.zeros(1, model.config.hidden_size, dtype=dtype, device=device)
    layer.one_row_matmuls(residual)
    model.compute_logits(residual)


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
