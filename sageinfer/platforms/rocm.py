"""ROCm builds of PyTorch: Hygon DCU and AMD GPUs. They answer to torch.cuda (HIP underneath) and
RCCL through the "nccl" backend name, so most of the CUDA platform holds; what is NVIDIA-only
(the Hopper prefill kernel, programmatic dependent launch, tensor-descriptor copies, NVIDIA's
datasheet peaks) is turned off. Not yet run on a DCU or an AMD GPU.
"""
from __future__ import annotations

import torch

from sageinfer.platforms.cuda import CudaPlatform


class RocmPlatform(CudaPlatform):
    name = "rocm"
    priority = 20
    load_with_expandable_segments = False  # measured on NVIDIA only

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available() and getattr(torch.version, "hip", None) is not None

    def supports_dependent_launch(self) -> bool:
        return False

    def supports_tensor_copies(self) -> bool:
        return False

    def prefers_int8_kernel(self) -> bool:
        return False  # the fast INT8 tiles are Hopper's (an MI250 also answers 9.0)

    def supports_fp8(self) -> bool:
        return False  # MI300's FP8 is the e4m3fnuz variant, which these kernels don't speak yet

    def prefill_attention(self):
        return None  # the platform kernel is written for Hopper's tensor cores and copy engine

    def peak_rates(self) -> tuple[float | None, float | None]:
        return None, None
