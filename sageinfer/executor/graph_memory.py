"""What the decode and prefill graphs will hold on the device, measured before the KV cache is sized.

The graphs are captured after the cache exists (they read its addresses), so without this the memory
profile gave their pools to the cache too: at a high gpu_memory_utilization the capture then ran out of
memory (Llama-3.1-70B in FP8 on an 80 GB card at 0.98). The memory profile captures a few of the ladders'
graphs on its throw-away cache instead, measures what the device lost, and scales that to the whole
ladders:

- the largest decode batch with all its variants, and the largest prefill bucket: a ladder's graphs share
  one pool, captured largest first, so its activations are what the largest one needs;
- the smallest decode batch after them: what one more graph costs beyond the shared pool (the driver's
  own memory for its launches), counted again for every graph not captured;
- each graph not captured keeps its output, counted at its rows.

The first capture in a process also leaves state that outlives its graphs (on an H100 up to 104 MiB: the
capture stream's library workspaces, kernels loaded for it): the estimate includes it, and says how much
(kept_bytes), since it is already gone from the free memory read after it. On an H100 (Qwen3-8B, 34 graphs)
the estimate came to 517 MiB, of which 104 kept; capturing the whole ladders again took 414 MiB.

The free memory is the device's: another process on it (instances that `sageinfer launch` starts on a shared
device) may allocate while the graphs are measured. Where the platform tells what this process's allocator
reserved, the measurement counts that plus an allowance for the driver's own part, no more; one more graph
counts at most PER_GRAPH_LIMIT_BYTES; and what stays taken counts only what this process's allocator holds
after such a measurement (the free memory read after it lacks the other process's share, not the graphs').

SAGEINFER_GRAPH_MEMORY_ESTIMATE=0 leaves the graphs out of the budget, as before."""
from __future__ import annotations

import gc
import logging
import os
from typing import Callable, NamedTuple

from sageinfer.executor.graph_runner import batch_size_of

GRAPH_MEMORY_ESTIMATE = os.environ.get("SAGEINFER_GRAPH_MEMORY_ESTIMATE", "1") != "0"
# The driver's part of the captured graphs beyond the allocator's (their launches, the kernels loaded for
# them), generously: not yet measured apart on a GPU, where the 5 graphs of Qwen3-8B or Llama-3.1-70B took
# 480-670 MiB in all on an H100, 104 MiB of it kept, and one more graph 0-2 MiB. It bounds what another
# process's allocations (a weight load: gigabytes) can add to the estimate.
DRIVER_ALLOWANCE_BYTES = 512 << 20
PER_GRAPH_LIMIT_BYTES = 8 << 20

logger = logging.getLogger(__name__)


class GraphMemory(NamedTuple):
    bytes: int            # the estimate for every graph of the ladders
    measured_bytes: int   # what the captured graphs (and the ladders' input buffers) took
    captured: int         # graphs captured to measure it
    graphs: int           # graphs the ladders capture at start-up
    per_graph_bytes: int  # one more graph beyond the shared pool
    kept_bytes: int       # what stayed taken once they were released (a first capture's state: not again)


def largest_and_smallest(keys: list) -> list:
    """The keys of the largest batch size (a decode batch's variants), then the smallest key."""
    if not keys:
        return []
    largest = max(batch_size_of(k) for k in keys)
    chosen = [k for k in keys if batch_size_of(k) == largest]
    smallest = min(keys, key=batch_size_of)
    return chosen + ([smallest] if smallest not in chosen else [])


def measure(platform, build_ladders: Callable) -> GraphMemory:
    """build_ladders(capture_only, after_each) -> the graph ladders (DecodeGraphs first), each capturing
    capture_only(its keys) and calling after_each(key) after each capture. Captures, measures and
    releases them; the device's free memory is back where it was, less what the driver keeps."""
    def free() -> int:
        platform.synchronize()
        return platform.mem_get_info()[0]
    marks: list[int] = []
    platform.empty_cache()
    start, reserved = free(), platform.memory_reserved()
    ladders = build_ladders(largest_and_smallest, lambda key: marks.append(free()))
    measured = lost = start - free()
    if reserved is not None:
        measured = min(lost, platform.memory_reserved() - reserved + DRIVER_ALLOWANCE_BYTES)
        if measured < lost:
            logger.warning("the device lost %.2f GiB while this process's graphs were measured, %.2f GiB more than "
                           "they can explain (another process on it?): counting %.2f GiB", lost / 2**30,
                           (lost - measured) / 2**30, measured / 2**30)
    decode = ladders[0]
    # The decode ladder's last capture (its smallest graph, after the largest batch's): what one more graph adds.
    per_graph = max(marks[len(decode.graphs) - 2] - marks[len(decode.graphs) - 1], 0) if len(decode.graphs) > 1 else 0
    per_graph = min(per_graph, PER_GRAPH_LIMIT_BYTES)
    estimate = measured + sum(_not_captured(ladder, per_graph) for ladder in ladders)
    captured, total = sum(len(ladder.graphs) for ladder in ladders), sum(len(ladder.keys) for ladder in ladders)
    del ladders, decode
    gc.collect()
    platform.synchronize()
    platform.empty_cache()
    kept = start - free()
    if measured < lost:  # what another process took is not this one's to keep: only what its allocator holds
        kept = min(kept, max(platform.memory_reserved() - reserved, 0))
    return GraphMemory(estimate, measured, captured, total, per_graph, min(kept, measured))


def _not_captured(ladder, per_graph: int) -> int:
    """What the ladder's graphs that were not captured add: one more graph each, and its output's rows."""
    if not ladder.graphs:
        return 0
    key = next(iter(ladder.outputs))
    row_bytes = ladder.outputs[key].nbytes // max(batch_size_of(key), 1)
    return sum(per_graph + batch_size_of(k) * row_bytes for k in ladder.keys if k not in ladder.graphs)
