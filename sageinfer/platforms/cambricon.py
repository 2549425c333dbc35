"""Cambricon MLUs through torch_mlu: `import torch_mlu` adds torch.mlu with torch.cuda's names
(mem_get_info, Stream, Event, MLUGraph / torch.mlu.graph), the device type "mlu", and the CNCL
collective backend ("cncl"). Triton kernels run through Cambricon's Triton where it is installed.
Not yet run on an MLU.
"""
from __future__ import annotations

from sageinfer.platforms.device_module import DeviceModulePlatform


class CambriconPlatform(DeviceModulePlatform):
    name = "cambricon"
    device_type = "mlu"
    dist_backend = "cncl"
    vendor_module = "torch_mlu"
    graph_class_name = "MLUGraph"
    ray_device_resource = "MLU"
    visible_devices_env = "MLU_VISIBLE_DEVICES"
    fp8 = False  # MLU370 / MLU590 have no FP8 matmul: INT8 for 8-bit weights and KV
