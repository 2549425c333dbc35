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

SAGEINFER_GRAPH_MEMORY_ESTIMATE=0 leaves the graphs out of the budget, as before."""
from __future__ import annotations

import gc
import os
from typing import Callable, NamedTuple

GRAPH_MEMORY_ESTIMATE = os.environ.get("SAGEINFER_GRAPH_MEMORY_ESTIMATE", "1") != "0"


class GraphMemory(NamedTuple):
    bytes: int            # the estimate for every graph of the ladders
    measured_bytes: int   # what the captured graphs (and the ladders' input buffers) took
    captured: int         # graphs captured to measure it
    graphs: int           # graphs the ladders capture at start-up
    per_graph_bytes: int  # one more graph beyond the shared pool
    kept_bytes: int       # what stayed taken once they were released (a first capture's state: not again)


def _size(key) -> int:
    return key[0] if isinstance(key, tuple) else key


def largest_and_smallest(keys: list) -> list:
    """The keys of the largest batch size (a decode batch's variants), then the smallest key."""
    if not keys:
        return []
    largest = max(_size(k) for k in keys)
    chosen = [k for k in keys if _size(k) == largest]
    smallest = min(keys, key=_size)
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
    start = free()
    ladders = build_ladders(largest_and_smallest, lambda key: marks.append(free()))
    measured = start - free()
    decode = ladders[0]
    # The decode ladder's last capture (its smallest graph, after the largest batch's): what one more graph adds.
    per_graph = max(marks[len(decode.graphs) - 2] - marks[len(decode.graphs) - 1], 0) if len(decode.graphs) > 1 else 0
    estimate = measured + sum(_not_captured(ladder, per_graph) for ladder in ladders)
    captured, total = sum(len(ladder.graphs) for ladder in ladders), sum(len(ladder.keys) for ladder in ladders)
    del ladders, decode
    gc.collect()
    platform.synchronize()
    platform.empty_cache()
    return GraphMemory(estimate, measured, captured, total, per_graph, start - free())


def _not_captured(ladder, per_graph: int) -> int:
    """What the ladder's graphs that were not captured add: one more graph each, and its output's rows."""
    if not ladder.graphs:
        return 0
    key = next(iter(ladder.outputs))
    row_bytes = ladder.outputs[key].nbytes // max(_size(key), 1)
    return sum(per_graph + _size(k) * row_bytes for k in ladder.keys if k not in ladder.graphs)
