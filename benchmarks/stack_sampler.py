"""Where one thread's time goes, by sampling its Python stack from another thread: for a phase that a
profiler would distort (start-up's model load, with compiling threads beside it). A sample lands on the
line the thread is at, also while it waits in C (a device call, the interpreter lock), so the table says
where the wall time went, not what the CPU did."""
from __future__ import annotations

import collections
import sys
import threading


class StackSampler:
    """Samples `thread_id`'s stack every `interval` seconds until stop(); each sample is counted under its
    innermost frame in a file whose path holds `focus` (the project's own code) and under its leaf frame."""

    def __init__(self, thread_id: int | None = None, interval: float = 0.002, focus: str = "sageinfer"):
        self.thread_id = thread_id if thread_id is not None else threading.main_thread().ident
        self.interval, self.focus = interval, focus
        self.samples = 0
        self.by_focus: collections.Counter = collections.Counter()
        self.by_leaf: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _where(frame) -> str:
        code = frame.f_code
        return f"{code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {code.co_name}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                continue
            self.samples += 1
            self.by_leaf[self._where(frame)] += 1
            inner = frame
            while inner is not None and self.focus not in inner.f_code.co_filename:
                inner = inner.f_back
            self.by_focus[self._where(inner) if inner is not None else "(outside " + self.focus + ")"] += 1

    def table(self, rows: int = 20) -> str:
        """The most sampled places, each with its share of the samples (the innermost project frame, then
        the leaf frame)."""
        lines = [f"{self.samples} samples, one every {self.interval * 1000:.0f} ms"]
        for title, counter in (("innermost " + self.focus + " frame", self.by_focus), ("leaf frame", self.by_leaf)):
            lines.append(f"  by {title}:")
            lines += [f"    {100 * n / max(1, self.samples):5.1f}%  {where}" for where, n in counter.most_common(rows)]
        return "\n".join(lines)

    def record(self, rows: int = 30) -> dict:
        return {"samples": self.samples, "interval_s": self.interval,
                "by_focus": self.by_focus.most_common(rows), "by_leaf": self.by_leaf.most_common(rows)}

