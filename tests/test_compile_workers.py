"""Start-up's Triton compiles in worker processes (ops/compile_workers.py): the variants the workers compile are
those the launches then find in the disk cache (compiled for sm_90 on this machine, which has no GPU), one
compile for a variant launched from several threads, and every way the workers can fail leaves the compile to
the launch, without waiting forever."""
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from triton import knobs

from sageinfer.ops import compile_workers
from sageinfer.ops.compile_workers import CompileWorkers, default_workers

HERE = os.path.dirname(__file__)


def _launches(tmp_path, workers: int) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / f"cache{workers}"))
    run = subprocess.run([sys.executable, os.path.join(HERE, "compile_workers_launches.py"), str(workers)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_launches_find_in_the_disk_cache_what_the_workers_compiled(tmp_path):
    """An RMS norm variant launched from three threads at once, an FP8-cache decode attention and, under the
    Triton the Hopper kernel is written for, its Gluon prefill kernel: with two workers, each variant compiled
    once, in a worker; the launches' own compiles then found the workers' entries (the disk cache holds exactly
    the entries of the same launches compiled without workers, not two of each)."""
    alone = _launches(tmp_path, 0)
    pooled = _launches(tmp_path, 2)
    assert len(alone["cache"]) == alone["variants"] == pooled["variants"] >= 2
    assert pooled["compiled"] == pooled["variants"] and pooled["failed"] == 0
    assert pooled["cache"] == alone["cache"]
    assert not pooled["hook_left"]


def _info(module="no_such_module_anywhere", name="_kernel"):
    """What Triton's hook names a kernel by (its JitFunctionInfo)."""
    return SimpleNamespace(module=module, name=name, jit_function=None)


VARIANT = {"specialization_data": json.dumps({"target": {"backend": "cuda", "arch": 90, "warp_size": 32}}),
           "device": 0}


def _returns(call, seconds: float = 60.0) -> None:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the launch waited on its workers for good"


def test_a_variant_no_worker_can_compile_is_left_to_the_launch():
    pool = CompileWorkers(1)
    try:
        _returns(lambda: pool.compile_before_launch(_info(), VARIANT))
        assert (pool.compiled, pool.failed) == (0, 1)
        # a kernel defined inside a function cannot be imported by a worker: not sent at all
        _returns(lambda: pool.compile_before_launch(_info(name="build.<locals>._kernel"), VARIANT))
        _returns(lambda: pool.compile_before_launch(_info(module="__main__"), VARIANT))  # nor a script's
        assert (pool.compiled, pool.failed) == (0, 1)
    finally:
        pool.close()


def test_workers_that_die_at_start_leave_every_compile_to_the_launches():
    pool = CompileWorkers(2, command=[sys.executable, "-c", "pass"])  # end before saying they are ready
    try:
        _returns(lambda: pool.compile_before_launch(_info(), VARIANT))
        deadline = time.monotonic() + 30
        while pool._live and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._live == 0
        _returns(lambda: pool.compile_before_launch(_info(name="_other"), VARIANT))
        assert pool.compiled == 0
    finally:
        pool.close()


def _one_variant_through(after_ready: str) -> tuple[CompileWorkers, float]:
    """One variant sent to a stand-in worker (a Python script that says it is ready, then runs after_ready);
    the closed pool and the seconds the launch waited."""
    command = [sys.executable, "-c", f"import sys, time; print('{{\"ready\": true}}', flush=True); {after_ready}"]
    pool = CompileWorkers(1, command=command)
    try:
        start = time.monotonic()
        _returns(lambda: pool.compile_before_launch(_info(), VARIANT), seconds=30)
        return pool, time.monotonic() - start
    finally:
        pool.close()


def test_a_stuck_worker_leaves_the_compile_to_the_launch_after_the_wait(monkeypatch):
    """A worker that never answers (it reads the variant and sleeps): the launch waits WAIT_SECONDS, then goes on."""
    monkeypatch.setattr(compile_workers, "WAIT_SECONDS", 1.0)
    pool, waited = _one_variant_through("sys.stdin.readline(); time.sleep(60)")
    assert 1.0 <= waited < 30
    assert pool._processes[0].wait(timeout=10) != 0  # ended by close(), not left sleeping


def test_a_worker_answering_nonsense_leaves_the_compile_to_the_launch_at_once():
    """A worker whose answer is not the protocol's (a stray line): the launch does not wait for the timeout."""
    pool, waited = _one_variant_through("sys.stdin.readline(); print('compiling...', flush=True); sys.stdin.readline()")
    assert waited < 10 and pool.compiled == 0


def test_the_hook_goes_to_the_newest_open_pool_and_leaves_with_the_last(monkeypatch):
    earlier = []

    def user_hook(**kwargs):  # a hook the user had installed: still called first
        earlier.append(kwargs["fn"].name)
        return kwargs["fn"].name == "skip"
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", user_hook)
    first, second = CompileWorkers(0), CompileWorkers(0)
    sent = []
    for pool in (first, second):
        monkeypatch.setattr(pool, "compile_before_launch", lambda fn, compile, pool=pool: sent.append(pool))
    hook = knobs.runtime.jit_cache_hook
    arguments = dict(key=None, repr="", compile=VARIANT, is_manual_warmup=False, already_compiled=False)
    assert hook(fn=_info(), **arguments) is False  # the launch compiles on
    assert hook(fn=_info(name="skip"), **arguments) is True and len(sent) == 1
    assert sent == [second] and earlier == ["_kernel", "skip"]
    second.close()
    knobs.runtime.jit_cache_hook(fn=_info(), **arguments)
    assert sent == [second, first]
    first.close()
    assert knobs.runtime.jit_cache_hook is user_hook


def test_the_count_is_named_or_leaves_a_cpu_to_each_rank_and_none_to_small_machines(monkeypatch):
    monkeypatch.delenv(compile_workers.COMPILE_WORKERS_ENV, raising=False)
    assert default_workers() == 0  # until a GPU's start-up has timed them
    monkeypatch.setenv(compile_workers.COMPILE_WORKERS_ENV, "3")
    assert default_workers() == 3
    monkeypatch.setenv(compile_workers.COMPILE_WORKERS_ENV, "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers() == 15
    assert default_workers(ranks_on_host=2) == 7
    assert default_workers(ranks_on_host=8) == 0  # 2 CPUs a rank
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers() == 0


@pytest.fixture(scope="module")
def tiny_engine():
    import tempfile
    from sageinfer import LLM
    from sageinfer.models.tiny import build_tiny_model
    with tempfile.TemporaryDirectory() as root:
        os.environ[compile_workers.COMPILE_WORKERS_ENV] = "2"
        try:
            yield LLM(build_tiny_model(os.path.join(root, "m"), "qwen3", seed=1), dtype="float32",
                      attention_backend="triton", num_gpu_blocks_override=16, max_model_len=64, enforce_eager=True,
                      show_progress=False).engine
        finally:
            del os.environ[compile_workers.COMPILE_WORKERS_ENV]


def test_the_engine_ends_its_workers_with_its_start_up(tiny_engine):
    """Asked for two workers: once started, the engine holds no pool and Triton no hook (a GPU's engine had one
    through start-up); ending start-up's compiles again is harmless."""
    assert tiny_engine.runner._compile_workers is None and not compile_workers._pools
    assert knobs.runtime.jit_cache_hook is None
    tiny_engine.runner.end_start_up_compiles()


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter's case")
def test_kernels_run_by_the_interpreter_get_no_workers(tiny_engine, monkeypatch):
    """Even on a platform that says it runs Triton (so only the interpreter stops it): nothing compiles."""
    monkeypatch.setenv(compile_workers.COMPILE_WORKERS_ENV, "4")
    monkeypatch.setattr(type(tiny_engine.platform), "supports_triton", True)
    assert tiny_engine.runner._start_compile_workers() is None


@pytest.fixture(autouse=True)
def _no_hook_left():
    yield
    assert not compile_workers._pools
