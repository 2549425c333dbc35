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

import triton
import triton.language as tl

from sageinfer.platforms.cuda_device import wait_grid_dependency_and_release_dependents

DEPENDENT_LAUNCH = False


@contextlib.contextmanager
def dependent_launch(enabled: bool):
    """Kernels launched (or captured) inside use dependent launch if enabled."""
    global DEPENDENT_LAUNCH
    previous, DEPENDENT_LAUNCH = DEPENDENT_LAUNCH, enabled
    try:
        yield
    finally:
        DEPENDENT_LAUNCH = previous


def dependent_launch_kwargs() -> dict:
    """Launch arguments of a kernel with a USE_PDL constexpr: the constexpr and the launch flag."""
    return {"USE_PDL": True, "launch_pdl": True} if DEPENDENT_LAUNCH else {"USE_PDL": False}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    if USE_PDL:  # only where the platform supports dependent launch
        wait_grid_dependency_and_release_dependents()
