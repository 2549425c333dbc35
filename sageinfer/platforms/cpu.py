from __future__ import annotations

import os

import torch

from sageinfer.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    priority = -100  # always available: the last resort
    fp8 = True  # through the reference (dequantizing) paths

    @classmethod
    def is_available(cls) -> bool:
        return True

    def int8_matmul(self, xq, wq):
        return torch._int_mm(xq, wq.t())

    def mem_get_info(self) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return free, total

    def kv_transfer_memory_type(self) -> str:
        return "DRAM"

    def default_kv_cache_bytes(self) -> int | None:
        # Host memory is shared with everything else: a modest fixed budget, not a fraction.
        return 1 << 30
