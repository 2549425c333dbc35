"""Kunlunxin XPUs (P800 and after) through Kunlunxin's PyTorch build and its torch_xmlir package. That
build runs in CUDA-compatible mode: tensors live on the "cuda" device, torch.cuda answers for memory,
streams and graphs, and the "nccl" backend name reaches BKCL underneath (as vLLM-Kunlun's platform
and Kunlunxin's deployment notes use it). So this is the CUDA platform told apart by torch_xmlir
(chosen before cuda by its priority), with what only NVIDIA has turned off. Not yet run on a
Kunlunxin machine.
"""
from __future__ import annotations

import importlib.util

import torch

from sageinfer.platforms.cuda import CudaPlatform


class KunlunPlatform(CudaPlatform):
    name = "kunlun"
    priority = 30
    kv_block_size = 16
    load_with_expandable_segments = False  # measured on NVIDIA only

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("torch_xmlir") is not None and torch.cuda.is_available()

    def supports_fp8(self) -> bool:
        return False  # no FP8 matmul on P800: INT8 for 8-bit weights and KV

    def supports_dependent_launch(self) -> bool:
        return False

    def supports_tensor_copies(self) -> bool:
        return False

    def prefers_int8_kernel(self) -> bool:
        return False  # the fast INT8 tiles are Hopper's

    def prefill_attention(self):
        return None  # the platform kernel is written for Hopper's tensor cores and copy engine

    def peak_rates(self) -> tuple[float | None, float | None]:
        return None, None
