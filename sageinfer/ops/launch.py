"""Launch options every kernel of a decode step shares.

Programmatic dependent launch (NVIDIA Hopper on): a kernel may be launched while the one before it
is still finishing; it waits for that kernel inside (gdc_wait) before touching what it produced, and
lets the next kernel launch once all its own programs are running. In a decode step of ~400 small
kernels this hides most of each launch's ramp-up behind the previous kernel's tail. Every kernel
launched this way waits first thing (before any early exit), so a kernel never completes before the
one it follows. The graph runner turns it on while capturing the graphs of small decode batches and of
whole-prompt prefills, where launches dominate (single-stream decode 6.41 -> 6.10 ms per token on an
H100); at decode batch 256 it measured ~1% slower and stays off.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import triton
import triton.language as tl

from sageinfer.platforms.cuda_device import wait_grid_dependency_and_release_dependents


class _LaunchMode(threading.local):
    """Per thread: the start-up's warm-up compiles graph (dependent) and eager variants from several
    threads at once."""
    dependent = False


_MODE = _LaunchMode()


@contextlib.contextmanager
def dependent_launch(enabled: bool):
    """Kernels this thread launches (or captures) inside use dependent launch if enabled."""
    previous, _MODE.dependent = _MODE.dependent, enabled
    try:
        yield
    finally:
        _MODE.dependent = previous


def dependent_launch_kwargs() -> dict:
    """Launch arguments of a kernel with a USE_PDL constexpr: the constexpr and the launch flag."""
    return {"USE_PDL": True, "launch_pdl": True} if _MODE.dependent else {"USE_PDL": False}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    if USE_PDL:  # only where the platform supports dependent launch
        wait_grid_dependency_and_release_dependents()


@functools.lru_cache(maxsize=None)
def interpreting() -> bool:
    """Whether kernels run in the Triton interpreter (CPU tests): fixed for the process, as Triton reads it
    when the kernels are defined."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device_index: int) -> int | None:
    """Bytes of shared memory one program may take on this device, from Triton's driver; None where
    no driver says (the interpreter)."""
    if interpreting():
        return None
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - a backend without the query: no limit known
        return None


def fit_key_tiles(block_m: int, block_n: int, num_stages: int, head_dim: int, element_size: int,
                  limit: int | None) -> tuple[int, int]:
    """(block_n, num_stages) of an attention kernel whose query tile [block_m, head_dim] stays in
    shared memory while key and value tiles [block_n, head_dim] are buffered at least twice (more
    from four stages on), shrunk (key tiles first, then stages) until they fit in `limit` bytes:
    tiles tuned for 16-bit caches overflow with 32-bit ones. Measured on Hopper's compiled kernels:
    float32, 128 x 128 tiles, head dim 128: 327,680 bytes at 2 or 3 stages; 128 x 64: 196,608."""
    def need(n, stages):
        return (block_m + 2 * n * max(2, stages - 1)) * head_dim * element_size + 4096  # + barriers
    while limit is not None and need(block_n, num_stages) > limit:
        if block_n > 16:
            block_n //= 2
        elif num_stages > 2:
            num_stages -= 1
        else:
            break
    return block_n, num_stages


def fit_key_tiles_for(q, k_cache, block_m: int, block_n: int, num_stages: int, head_dim: int) -> tuple[int, int]:
    """fit_key_tiles for an attention launch over q and a cache: the wider element of the two, the
    limit of q's device."""
    return fit_key_tiles(block_m, block_n, num_stages, head_dim, max(q.element_size(), k_cache.element_size()),
                         shared_memory_limit(q.device.index or 0))
