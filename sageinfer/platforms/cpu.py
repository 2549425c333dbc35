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

    def share_memory_handle(self, tensor):
        # In place: the storage moves into an anonymous shared-memory file, and another process of
        # this user maps that file through this process's descriptor table (gone with the process).
        tensor.share_memory_()
        fd, size = tensor.untyped_storage()._share_fd_cpu_()
        return {"path": f"/proc/{os.getpid()}/fd/{fd}", "bytes": size, "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape), "stride": list(tensor.stride()), "offset": tensor.storage_offset()}

    def open_memory_handle(self, handle):
        mapped = torch.from_file(handle["path"], shared=True, size=handle["bytes"], dtype=torch.uint8)
        return mapped.view(getattr(torch, handle["dtype"])).as_strided(handle["shape"], handle["stride"], handle["offset"])

    def kv_transfer_memory_type(self) -> str:
        return "DRAM"

    def default_kv_cache_bytes(self) -> int | None:
        # Host memory is shared with everything else: a modest fixed budget, not a fraction.
        return 1 << 30
