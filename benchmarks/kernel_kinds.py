"""A profile's kernels summed by kind (GEMM, attention, the rest), so a run's time can be set beside its floor:
the GEMMs against the matmul ceiling, attention against the KV cache's bytes or causal FLOPs."""
from __future__ import annotations

# Name fragments, looked for in lower case, first kind that matches wins: cuBLAS's kernels (nvjet, cutlass,
# gemm), the engine's Triton matmuls, weight-only tiles and one-row GEMVs; its attention kernels and their split
# merges. Quantized weights expanded for a library GEMM (_dequantize_kernel) count as other: above the floor.
KINDS = (
    ("GEMM", ("nvjet", "cutlass", "gemm", "gemv", "matmul", "xmma", "weight_only")),
    ("attention", ("attention", "ws_prefill", "merge_splits", "widen_pages")),
)
OTHER = "other"


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, parts in KINDS if any(p in lower for p in parts)), OTHER)


def seconds_by_kind(kernels: dict[str, float]) -> dict[str, float]:
    """{kernel name: seconds} -> {kind: seconds}, every kind present (0.0 where none ran)."""
    totals = {kind: 0.0 for kind, _ in KINDS} | {OTHER: 0.0}
    for name, seconds in kernels.items():
        totals[kernel_kind(name)] += seconds
    return totals
