"""Split-K in one launch: programs that share an output tile each sum a part of the inputs, store it in
a plane of their own and count themselves; the part that counts last adds the planes and finishes the
tile, so no second kernel reduces them (a graph of decode steps launches nothing more)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def add_parts(acc, planes, mask, counter, plane_size, part, SPLITS: tl.constexpr):
    """Split-K without a second launch: store this part's fp32 sums in its plane and count it; returns
    the count before (SPLITS - 1: this part came last) and, for the last part, the sum of all planes.
    The last part sets the count back to 0 for the next launch (a graph replays the same counts)."""
    tl.store(planes + part * plane_size, acc, mask=mask)
    tl.debug_barrier()  # every thread's stores before the count that releases them
    count = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    total = tl.zeros_like(acc)
    if count == SPLITS - 1:
        for p in tl.static_range(SPLITS):  # past L1: other processors wrote these
            total += tl.load(planes + p * plane_size, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter, 0)
    return count, total


_COUNTERS: dict = {}
_OUTGROWN: list = []  # counts a captured graph may still use: never freed


def split_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counts, one per output tile, that a split launch leaves zeroed again: made once per
    device (a larger set when a launch needs more), so that no launch pays for a memset. Launches on
    one stream take turns with them."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = _COUNTERS[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


def split_launch(tiles: int, step: int, k: int, m: int, n: int, min_programs: int,
                 unused: torch.Tensor) -> tuple[int, dict]:
    """How a launch of `tiles` output tiles over K (walked `step` at a time) splits: (parts, the split
    arguments of the kernel). K is cut in as many parts as bring the programs to min_programs (one
    part where the tiles are already as many), each a whole number of steps; with one part `unused`
    (any tensor) stands in for the planes and counts."""
    steps = triton.cdiv(k, step)
    parts = min(steps, triton.cdiv(min_programs, tiles)) if min_programs > tiles else 1
    k_per_split = triton.cdiv(steps, parts) * step
    parts = triton.cdiv(k, k_per_split)
    if parts == 1:
        return 1, dict(part_ptr=unused, counter_ptr=unused, k_per_split=k_per_split, SPLITS=1)
    return parts, dict(part_ptr=torch.empty(parts, m, n, dtype=torch.float32, device=unused.device),
                       counter_ptr=split_counters(tiles, unused.device), k_per_split=k_per_split, SPLITS=parts)
