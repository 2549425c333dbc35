"""Start-up's Triton compiles in worker processes: more compiles at once than the engine's warm-up threads, and
none of the compiler's Python in the engine's process (12-03f read a slower weights' load beside eight
compiling threads as the interpreter lock; on a CPU, one compiling thread left a Python loop 98% of its speed:
benchmarks/results/2026-12-05c-cpu-compile-workers-int8-descriptors.md). Off unless SAGEINFER_COMPILE_WORKERS
asks for it, until a GPU machine's start-up has timed it.

While start-up runs, Triton's pre-compile hook (knobs.runtime.jit_cache_hook) hands each new kernel variant
to a pool of processes (ops/compile_worker.py): one of them compiles it into the shared disk cache while
the launching thread waits without the lock. The launch then compiles as before and finds the variant in
the disk cache. So the pool changes only where a compile happens, never what is compiled: a variant a
worker cannot rebuild (a kernel defined inside a function) or fails to compile, or any variant once no
worker is alive, is compiled by the launch itself, as without workers."""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import Future

logger = logging.getLogger(__name__)

COMPILE_WORKERS_ENV = "SAGEINFER_COMPILE_WORKERS"
WORKER_COMMAND = [sys.executable, "-m", "sageinfer.ops.compile_worker"]
# The longest a launch waits for its worker before compiling the variant itself (a stuck worker must not
# stall start-up for good; one compile takes seconds, an FP4 tensor-core variant about 20 s on one core).
WAIT_SECONDS = 300.0


def default_workers(ranks_on_host: int = 1) -> int:
    """SAGEINFER_COMPILE_WORKERS: a count, or "auto" for the CPUs this process may use, shared among the host's
    ranks, less one for the rank itself (at most 16; none below 4 CPUs a rank, where a worker's imports of torch
    and Triton, about a second of a CPU, are not won back). Unset or 0: the launching threads compile, as
    before; the default until a GPU machine's start-up has timed the two (benchmarks/startup_compiles.py)."""
    named = os.environ.get(COMPILE_WORKERS_ENV, "0").strip().lower()
    if named != "auto":
        return max(int(named), 0)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    share = cpus // max(ranks_on_host, 1)
    return min(share - 1, 16) if share >= 4 else 0


class CompileWorkers:
    """A pool of compiling processes for one start-up. While it is open, Triton's pre-compile hook sends it
    every new variant (the most recently opened pool, where several engines start in one process); close()
    once start-up is over ends the processes and, with the last open pool, the hook."""

    def __init__(self, workers: int, command: list[str] | None = None):
        self._command = command or WORKER_COMMAND
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._jobs: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._started = False
        self._live = workers
        self._closed = False
        self.workers = workers
        self.compiled = 0  # variants the workers compiled
        self.failed = 0  # variants they did not: the launch compiled those itself
        self.compile_seconds = 0.0  # the workers' compile time, summed
        self._processes: list[subprocess.Popen] = []
        _open(self)

    def _start(self) -> None:
        """The processes, at the first variant to compile (none where the disk cache holds every one)."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the kernels' modules
        for i in range(self.workers):
            try:
                process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
            except OSError:
                logger.warning("a compile worker did not start", exc_info=True)
                self._live -= 1
                continue
            self._processes.append(process)
            threading.Thread(target=self._serve, args=(process,), name=f"compile-worker-{i}", daemon=True).start()

    def close(self) -> None:
        """End the hook's use of this pool and the workers. Start-up has waited for every compile it asked for
        (or given up on it), so a worker still busy is stuck: each is ended at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            processes = list(self._processes)
        _close(self)
        for _ in range(self.workers):  # to the idle workers' threads (harmless where none started)
            self._queue.put((2, next(self._order), None, None))
        for process in processes:
            process.kill()
        if self.compiled or self.failed:
            logger.info("start-up compiled %d Triton kernel variants in %d worker processes (%.1f s of compiling)%s",
                        self.compiled, self.workers, self.compile_seconds,
                        f"; the engine compiled {self.failed} itself" if self.failed else "")

    def compile_before_launch(self, fn, compile: dict) -> None:
        """What the hook does with a launch's new variant (fn: Triton's JitFunctionInfo, compile: the hook's
        description of the variant): a worker compiles it, or already is, and the launch waits for it.
        Returns at once where no worker can."""
        job = _job(fn, compile)
        if job is None:
            return
        with self._lock:
            if not self._started:
                self._started = True
                self._start()
            if self._closed or self._live == 0:
                return
            future = self._jobs.get(job)
            if future is None:  # a variant launched from two threads at once compiles once
                future = self._jobs[job] = Future()
                # The engine's own thread (the memory profile's step, the graphs' capture) goes first.
                first = 0 if threading.current_thread() is threading.main_thread() else 1
                self._queue.put((first, next(self._order), job, future))
        try:
            future.result(timeout=WAIT_SECONDS)
        except Exception:  # noqa: BLE001 - the launch compiles it itself, and raises its own error if any
            pass

    def _serve(self, process: subprocess.Popen) -> None:
        """One worker's thread: hands it queued variants one at a time until close() or its end."""
        try:
            if not _answer(process).get("ready"):
                return
            while True:
                _, _, job, future = self._queue.get()
                if job is None:
                    return
                module, qualname, specialization, target, source = job
                try:
                    process.stdin.write(json.dumps({"module": module, "qualname": qualname, "source": source,
                                                    "specialization": specialization, "target": target}) + "\n")
                except OSError:
                    pass  # the worker is gone: no answer follows
                answer = _answer(process)
                if not answer:
                    future.set_exception(RuntimeError("the compile worker ended"))
                    return
                self._settle(future, answer)
        finally:
            self._worker_ended(process)

    def _settle(self, future: Future, answer: dict) -> None:
        if "seconds" not in answer:
            answer = {"error": answer.get("error", f"an answer without a result: {answer}")}
        with self._lock:
            if "error" in answer:
                self.failed += 1
                logger.debug("a compile worker failed: %s", answer["error"])
            else:
                self.compiled += 1
                self.compile_seconds += answer["seconds"]
        if "error" in answer:
            future.set_exception(RuntimeError(answer["error"]))
        else:
            future.set_result(answer["seconds"])

    def _worker_ended(self, process: subprocess.Popen) -> None:
        """Reap the worker; once none is left before close(), fail what waits (the launches compile it)."""
        try:
            process.stdin.close()
        except OSError:
            pass
        process.wait()
        with self._lock:
            self._live -= 1
            if self._live > 0 or self._closed:
                return
        while True:
            try:
                _, _, job, future = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                with self._lock:
                    self.failed += 1
                future.set_exception(RuntimeError("no compile worker is left"))


def _answer(process: subprocess.Popen) -> dict:
    """A worker's next line, parsed; {} where it ended or wrote something else."""
    try:
        line = process.stdout.readline()
        answer = json.loads(line) if line else {}
    except (OSError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


# The source classes a worker rebuilds a variant from (compile_worker._source_class): Triton's and Gluon's.
_SOURCES = ("ASTSource", "GluonASTSource")


def _job(fn, compile: dict) -> tuple | None:
    """(module, qualname, specialization, target, source class) of a variant, None where a worker cannot
    rebuild it."""
    specialization = compile.get("specialization_data")
    if specialization is None or "<locals>" in fn.name or fn.module == "__main__":  # not importable by name
        return None
    source = getattr(getattr(fn.jit_function, "ASTSource", None), "__name__", "ASTSource")
    if source not in _SOURCES:
        return None
    target = json.loads(specialization).get("target")  # newer Tritons write it; older ones keep it per device
    if target is None:
        caches = getattr(fn.jit_function, "device_caches", {})
        if compile.get("device") not in caches:
            return None
        target = caches[compile["device"]][2].__dict__
    return fn.module, fn.name, specialization, (target["backend"], target["arch"], target["warp_size"]), source


# ---- Triton's hook, installed while any pool is open ----------------------------------------------------
_pools: list[CompileWorkers] = []
_hook_before = None  # the hook that was installed when the first pool opened
_pools_lock = threading.Lock()


def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    if _hook_before is not None and _hook_before(key=key, repr=repr, fn=fn, compile=compile,
                                                 is_manual_warmup=is_manual_warmup,
                                                 already_compiled=already_compiled):
        return True
    with _pools_lock:
        pool = _pools[-1] if _pools else None
    if pool is not None:
        pool.compile_before_launch(fn, compile)
    return False  # the launch compiles on (from the disk cache where a worker filled it)


def _open(pool: CompileWorkers) -> None:
    global _hook_before
    from triton import knobs
    with _pools_lock:
        if not _pools:
            _hook_before = knobs.runtime.jit_cache_hook
            knobs.runtime.jit_cache_hook = _hook
        _pools.append(pool)


def _close(pool: CompileWorkers) -> None:
    from triton import knobs
    with _pools_lock:
        _pools.remove(pool)
        if not _pools and knobs.runtime.jit_cache_hook is _hook:
            knobs.runtime.jit_cache_hook = _hook_before
