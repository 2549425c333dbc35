"""Launch options every kernel of a decode step shares.

Programmatic dependent launch (NVIDIA Hopper on): a kernel may be launched while the one before it
is still finishing; it waits for that kernel inside (gdc_wait) before touching what it produced, and
lets the next kernel launch once all its own programs are running. In a decode step of ~400 small
kernels this hides most of each launch's ramp-up behind the previous kernel's tail. Every kernel
launched this way waits first thing (before any early exit), so a kernel never completes before the
one it follows. Set by the model runner from Platform.supports_dependent_launch().
"""
from __future__ import annotations

import triton
import triton.language as tl

DEPENDENT_LAUNCH = False


def dependent_launch_kwargs() -> dict:
    return {"launch_pdl": True} if DEPENDENT_LAUNCH else {}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
