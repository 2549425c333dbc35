"""What a serving process's start-up made (an engine, a rank, the server, the router) lives as long as the process:
it is taken out of the garbage collector's full passes.

A full pass walks every object the collector tracks. After start-up that is some 380K objects (torch, Triton,
transformers, the model), so each pass stopped the engine's loop for about 100-200 ms on a CPU (logprobs keep
many objects alive, which brings passes on: 256 sequences with logprobs=5, 16.8 -> 9.2 ms of host time a step
with the heap frozen; benchmarks/host_step.py). gc.freeze() moves the objects alive at the end of start-up into a
generation no pass walks; vLLM's engine does the same. A new engine in the same process (offline, one after another)
thaws the heap and collects first, so an engine dropped before it is still collected before it allocates.
"""
from __future__ import annotations

import atexit
import gc


def freeze_start_up_heap() -> None:
    """Collect what start-up left as garbage, then freeze everything still alive."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Give frozen objects back to the collector and collect: a new engine is starting, and the garbage among them
    (an engine dropped since, cycles and all) holds device memory that the new engine's memory profile must find
    free."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


# At exit the interpreter's last collection must see every object (extension modules check for leaks then).
atexit.register(gc.unfreeze)
