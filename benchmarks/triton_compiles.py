"""Which Triton kernels compile while a benchmark runs, how often and for how long: a first request of a
new shape pays its kernel's compile (or its load from the disk cache) in its own latency."""
from __future__ import annotations

import collections
import threading
import time

import triton


class CompileLog:
    """Notes each in-process kernel-cache miss (a compile, or a load from the disk cache) by kernel name,
    with its seconds and the argument signature that missed; from any thread (the start-up's warm-up
    compiles from several: their seconds overlap, so the total can exceed the wall time)."""

    def __init__(self):
        self.count = collections.Counter()
        self.seconds = collections.Counter()
        self.signatures = collections.defaultdict(list)
        self._thread = threading.local()
        self._lock = threading.Lock()
        runtime = triton.knobs.runtime
        self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook = self._before
        runtime.jit_post_compile_hook = self._after

    def _before(self, *, fn, compile, **_):
        try:
            signature = self._describe(fn, compile)
        except Exception as e:  # a triton whose hook arguments differ: the count and seconds still hold
            signature = f"(not described: {e!r})"
        self._thread.started = (fn.name, signature, time.perf_counter())
        return False  # compile as usual

    @staticmethod
    def _describe(fn, compile) -> str:
        """What tells two compiles of one kernel apart: its constexpr values and the specialised
        attributes of its other arguments (value 1, divisibility or alignment by 16)."""
        names = [p.name for p in fn.jit_function.params]
        constants = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v
                     for k, v in compile["constants"].items()}
        attrs = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v
                 for config in compile["configs"] for k, v in dict(config).items()}
        return f"constants {constants} attributes {attrs}"

    def _after(self, *, fn, **_):
        started = getattr(self._thread, "started", None)
        if started is None or started[0] != fn.name:
            return
        name, signature, t = started
        with self._lock:
            self.count[name] += 1
            self.seconds[name] += time.perf_counter() - t
            self.signatures[name].append(signature)
        self._thread.started = None

    def reset(self):
        self.count.clear(), self.seconds.clear(), self.signatures.clear()

    def total(self) -> tuple[int, float]:
        return sum(self.count.values()), sum(self.seconds.values())

    def table(self, top: int = 12) -> str:
        rows = ["| kernel | compiles | s |", "| --- | --- | --- |"]
        for name, s in self.seconds.most_common(top):
            rows.append(f"| {name} | {self.count[name]} | {s:.2f} |")
        return "\n".join(rows)

    def close(self):
        triton.knobs.runtime.jit_cache_hook, triton.knobs.runtime.jit_post_compile_hook = self._previous
