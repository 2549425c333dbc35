"""Platforms whose vendor extends PyTorch with a device module shaped like torch.cuda (importing the
vendor's package adds torch.npu, torch.mlu, ...): memory, streams, events and graphs are asked of
that module under the same names. What NVIDIA alone has (dependent launch, tensor-descriptor
copies, the Hopper kernel) stays off: the portable Triton kernels and the reference attention run.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

from sageinfer.platforms.base import Platform


class DeviceModulePlatform(Platform):
    vendor_module = ""        # the package that registers the device with PyTorch
    graph_class_name = ""     # the device module's graph class ("" : no graph capture)
    supports_graphs = False
    priority = 30             # a vendor's device before a GPU torch also reports

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec(cls.vendor_module) is None:
            return False
        try:
            importlib.import_module(cls.vendor_module)
            return bool(getattr(torch, cls.device_type).is_available())
        except Exception:  # noqa: BLE001 - a broken driver or toolkit: not available, the reason in the smoke test
            return False

    def __init__(self):
        importlib.import_module(self.vendor_module)
        self.api = getattr(torch, self.device_type)
        self.supports_graphs = bool(self.graph_class_name) and hasattr(self.api, self.graph_class_name)
        self.supports_triton = importlib.util.find_spec("triton") is not None
        self.preferred_attention_backend = "triton" if self.supports_triton else "torch_ref"

    def device_name(self) -> str:
        return self.api.get_device_name()

    def set_device(self, index: int) -> None:
        self.api.set_device(index)

    def device_count(self) -> int | None:
        return self.api.device_count()

    def synchronize(self) -> None:
        self.api.synchronize()

    def mem_get_info(self) -> tuple[int, int]:
        return self.api.mem_get_info()

    def reset_peak_memory(self) -> None:
        self.api.reset_peak_memory_stats()

    def peak_memory_allocated(self) -> int:
        return self.api.max_memory_allocated()

    def memory_allocated(self) -> int:
        return self.api.memory_allocated()

    def memory_reserved(self) -> int | None:
        reserved = getattr(self.api, "memory_reserved", None)
        return reserved() if reserved is not None else None

    def empty_cache(self) -> None:
        self.api.empty_cache()

    def graph_class(self):
        return getattr(self.api, self.graph_class_name)

    def graph_context(self, graph, pool=None, stream=None):
        return self.api.graph(graph, pool=pool, stream=stream)

    def graph_pool_handle(self):
        return self.api.graph_pool_handle()

    def stream(self, device=None):
        return self.api.Stream() if device is None else self.api.Stream(device=device)

    def copy_stream_context(self, stream):
        return self.api.stream(stream)

    def wait_for(self, stream) -> None:
        self.api.current_stream().wait_stream(stream)

    def record_event(self):
        event = self.api.Event()
        event.record()
        return event

    def wait_event(self, event) -> None:
        self.api.current_stream().wait_event(event)

    def to_host_async(self, tensors: list[torch.Tensor]):
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        return host, self.record_event()

    def host_buffer(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
