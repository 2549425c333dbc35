"""Huawei Ascend NPUs through torch_npu (Ascend Extension for PyTorch): `import torch_npu` adds
torch.npu with torch.cuda's names (mem_get_info, Stream, Event, NPUGraph / torch.npu.graph for ACL
graph capture), the device type "npu", and the HCCL collective backend ("hccl",
torch.distributed.ProcessGroupHCCL in the torch_npu API reference). Triton kernels run through
triton-ascend where it is installed. Not yet run on an Ascend machine.
"""
from __future__ import annotations

from sageinfer.platforms.device_module import DeviceModulePlatform


class AscendPlatform(DeviceModulePlatform):
    name = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    vendor_module = "torch_npu"
    graph_class_name = "NPUGraph"
    ray_device_resource = "NPU"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    # vllm-ascend's attention kernels take blocks of 128 tokens; the portable kernels take any size,
    # and 128 keeps a prefix-cache hit a whole number of the vendor kernels' blocks.
    kv_block_size = 128
    # Atlas A2 / A3 (910B / 910C) have no FP8 matmul: 8-bit weights and KV are INT8 there.
    fp8 = False
