"""Triton device functions that only NVIDIA's Triton backend provides; kernels reach them behind a
constexpr the platform decides (see ops/launch.py), so other backends never compile them."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_grid_dependency_and_release_dependents():
    """Programmatic dependent launch (Hopper on): wait for the grid this one depends on, then let
    the next grid start launching."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
