"""--kv-transfer-config: which connector moves KV between instances, and this instance's role in it.
vLLM's field names, so that deployment recipes carry over:
  {"kv_connector": "DeviceIpcConnector" | "SharedMemoryConnector" | "NixlConnector" | "TorchDistributedConnector",
   "kv_role": "kv_producer" | "kv_consumer" |
   "kv_both", "engine_id": ..., "kv_connector_extra_config": {...}}
"""
from __future__ import annotations

import uuid

from sageinfer.transport.json_options import json_object_option

CONNECTORS = {
    # same host: the decode instance maps the prefill instance's cache (CUDA IPC) and copies device to
    # device; block sizes may differ
    "DeviceIpcConnector": "sageinfer.transport.ipc_connector",
    # same host: KV staged in shared host memory (/dev/shm), token-major, so block sizes may differ
    "SharedMemoryConnector": "sageinfer.transport.shm_connector",
    # any host: NIXL (UCX: RDMA where the machine has it, TCP or shared memory where it does not)
    "NixlConnector": "sageinfer.transport.nixl_connector",
    # any platform: torch.distributed point-to-point between the pair (gloo, NCCL, a vendor's library)
    "TorchDistributedConnector": "sageinfer.transport.torch_dist_connector",
}
ALIASES = {"ipc": "DeviceIpcConnector", "shm": "SharedMemoryConnector", "nixl": "NixlConnector", "torch_dist": "TorchDistributedConnector"}
ROLES = ("kv_producer", "kv_consumer", "kv_both")


def parse_kv_transfer_config(value) -> dict | None:
    """A validated dict (defaults filled in) from JSON text or a dict; None stays None."""
    known = {"kv_connector", "kv_role", "engine_id", "kv_connector_extra_config", "kv_rank", "kv_parallel_size",
             "kv_ip", "kv_port", "kv_buffer_device"}
    value = json_object_option(value, "kv_transfer_config", known)
    if value is None:
        return None
    connector = ALIASES.get(value.get("kv_connector"), value.get("kv_connector"))
    if connector not in CONNECTORS:
        raise ValueError(f"kv_transfer_config: kv_connector {value.get('kv_connector')!r} is not supported; "
                         f"supported: {sorted(CONNECTORS)}")
    role = value.get("kv_role")
    if role not in ROLES:
        raise ValueError(f"kv_transfer_config: kv_role must be one of {list(ROLES)}, got {role!r}")
    extra = value.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ValueError("kv_transfer_config: kv_connector_extra_config must be a JSON object")
    return {"kv_connector": connector, "kv_role": role, "engine_id": str(value.get("engine_id") or uuid.uuid4().hex),
            "kv_connector_extra_config": dict(extra)}


def build_connector(config: dict, kv_caches: list, block_size: int, platform, tensor_parallel_size: int = 1,
                    kv_heads_by_rank: list[tuple[int, int]] | None = None):
    """The configured transport.remote_kv.RemoteKVConnector over this instance's cache (rank 0's; the
    connector reaches the other ranks' where it supports tensor parallelism). kv_heads_by_rank: per
    rank, (first, count) of the model's KV heads it holds."""
    import importlib
    module = importlib.import_module(CONNECTORS[config["kv_connector"]])
    connector_class = getattr(module, config["kv_connector"])
    if config["kv_connector"] == "DeviceIpcConnector":
        return connector_class(config, kv_caches, block_size, platform, tensor_parallel_size, kv_heads_by_rank)
    return connector_class(config, kv_caches, block_size, platform)


def export_rank_cache(config: dict, kv_caches: list, platform, rank: int) -> None:
    """On a tensor-parallel rank other than 0: make its cache reachable to the connector on rank 0,
    where the connector needs that (DeviceIpcConnector)."""
    import importlib
    module = importlib.import_module(CONNECTORS[config["kv_connector"]])
    if hasattr(module, "export_rank_cache"):
        module.export_rank_cache(config, kv_caches, platform, rank)
