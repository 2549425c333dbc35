"""Whether two instances' KV transfer connectors pair, from what each says of itself: no torch here,
so that a PD proxy reads it without loading an engine."""
from __future__ import annotations

PRODUCER_ROLES, CONSUMER_ROLES = ("kv_producer", "kv_both"), ("kv_consumer", "kv_both")


def per_model_tensors(tensors: list) -> list:
    """A KV layout's tensors (kv_layout: [dtype, shape of one token's entry]) without the KV heads of
    one rank: what two instances of different tensor-parallel sizes share (None for a malformed entry)."""
    return [[dtype, shape[1:]] if isinstance(shape, list) else None for dtype, shape in tensors]


def pairing_mismatch(prefill: dict, decode: dict) -> str | None:
    """Why a decode instance can't load a prefill instance's KV, from what each describes of itself
    (RemoteKVConnector.description), or None. What a PD proxy checks before pairing them; each
    request's kv_transfer_params are checked again when loaded."""
    if prefill["kv_connector"] != decode["kv_connector"]:
        return f"different connectors ({prefill['kv_connector']} and {decode['kv_connector']})"
    if prefill["kv_connector"] == "NixlConnector" and prefill["block_size"] != decode["block_size"]:
        return (f"NixlConnector needs one block size on both sides ({prefill['block_size']} and "
                f"{decode['block_size']}): give both the same --block-size")
    theirs, ours = prefill["layout"], decode["layout"]
    # the device-to-device connector copies heads across tensor-parallel sizes
    same = per_model_tensors if prefill["kv_connector"] == "DeviceIpcConnector" else (lambda tensors: tensors)
    if same(theirs["tensors"]) != same(ours["tensors"]) or theirs["fp8_scales"] != ours["fp8_scales"]:
        return (f"their KV caches differ (layers, KV heads, head size or kv_cache_dtype): "
                f"{len(theirs['tensors'])} tensors {theirs['tensors'][0]} and "
                f"{len(ours['tensors'])} tensors {ours['tensors'][0]}")
    return None
