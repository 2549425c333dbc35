"""Run by tests/test_compile_workers.py in a process of its own (Triton compiling, not interpreting): kernels
of the engine launched for an sm_90 GPU that this machine does not have (a stand-in for Triton's driver,
which only names the device, its stream and its target), with or without a pool of compile workers; prints
what the pool did and the disk cache's entries as JSON.

  TRITON_INTERPRET=0 TRITON_CACHE_DIR=<empty dir> python tests/compile_workers_launches.py <workers>"""
import json
import os
import sys
import threading

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sageinfer.ops import paged_attention, rms_norm  # noqa: E402
from sageinfer.ops.compile_workers import CompileWorkers  # noqa: E402


class Sm90Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def norm_launch():
    """An RMS norm's variant, compiled without a launch (Triton's warmup)."""
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    rms_norm._rms_norm_kernel.warmup(x, x, torch.ones(256, dtype=torch.bfloat16), x, x, 256, 0, 256, 256, 1e-6,
                                     HAS_RESIDUAL=False, BLOCK=256, USE_PDL=False, grid=(4,))


def fp8_decode_launch():
    """Decode attention over an FP8 cache through the engine's op: its kernel compiles, then the launch
    fails where a device is needed."""
    seqs, heads, kv_heads, dim, page = 2, 4, 2, 64, 16
    cache = torch.zeros(seqs, page, kv_heads, dim, dtype=torch.float8_e4m3fn)
    q = torch.zeros(seqs, heads, dim, dtype=torch.bfloat16)
    try:
        paged_attention.paged_attention(q, cache, cache, torch.empty_like(q),
                                        torch.arange(seqs, dtype=torch.int32).view(seqs, 1),
                                        torch.full((seqs,), page, dtype=torch.int32),
                                        torch.arange(seqs + 1, dtype=torch.int32), seqs, 1, 0.1, max_seq_len=page,
                                        kv_mode=1)
    except AttributeError:  # the stand-in driver loads no kernel
        pass


def gluon_prefill_launch() -> bool:
    """The platform's Gluon prefill kernel (Hopper), where this Triton's Gluon is the one it is written for
    (3.6): a Gluon kernel compiles from a source class of its own, which a worker must use too. Whether it ran."""
    try:
        from sageinfer.platforms import hopper_attention
    except Exception:  # noqa: BLE001 - another Triton's Gluon API
        return False
    pages, page, kv_heads, dim, tokens = 4, 64, 2, 128, 64
    cache = torch.zeros(pages, page, kv_heads, dim, dtype=torch.bfloat16)
    q = torch.zeros(tokens, 8, dim, dtype=torch.bfloat16)
    try:
        hopper_attention.prefill_attention(q, cache, cache.clone(), torch.empty_like(q),
                                           torch.arange(pages, dtype=torch.int32).view(1, -1),
                                           torch.tensor([tokens], dtype=torch.int32),
                                           torch.tensor([0, tokens], dtype=torch.int32), 1, tokens, 0.1)
    except AttributeError:  # the stand-in driver loads no kernel
        pass
    return True


def main():
    workers = int(sys.argv[1])
    saved = driver._active
    driver.set_active(Sm90Driver())
    pool = CompileWorkers(workers) if workers else None
    try:
        threads = [threading.Thread(target=norm_launch) for _ in range(3)]  # one variant from three threads
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fp8_decode_launch()
        variants = 2 + gluon_prefill_launch()
    finally:
        if pool is not None:
            pool.close()
        driver._active = saved
    from triton import knobs
    print(json.dumps({"variants": variants, "compiled": pool.compiled if pool else 0,
                      "failed": pool.failed if pool else 0,
                      "cache": sorted(os.listdir(os.environ["TRITON_CACHE_DIR"])),
                      "hook_left": knobs.runtime.jit_cache_hook is not None}))


if __name__ == "__main__":
    main()
