"""A PD proxy pairs instances by what their /kv_transfer says (transport/kv_pairing.py): an instance of
the wrong role, or whose KV cannot go to (or come from) the other side's, stays out of rotation with
the reason; instances that say nothing (not sageInfer's) are taken unchecked."""
import asyncio

import httpx

from sageinfer.router.backends import BackendPool
from sageinfer.router.pd_proxy import build_pd_proxy_app
from sageinfer.transport.kv_pairing import pairing_mismatch

BF16 = {"tensors": [["bfloat16", [8, 128]]] * 4, "fp8_scales": [1.0, 1.0]}


def _info(connector="SharedMemoryConnector", role="kv_producer", block_size=16, layout=BF16):
    return {"kv_connector": connector, "kv_role": role, "engine_id": "e", "block_size": block_size, "layout": layout}


def test_pairing_needs_one_connector_one_cache_layout_and_for_nixl_one_block_size():
    assert pairing_mismatch(_info(), _info(role="kv_consumer", block_size=64)) is None  # sizes may differ
    assert "different connectors" in pairing_mismatch(_info(), _info("NixlConnector", "kv_consumer"))
    assert "one block size" in pairing_mismatch(_info("NixlConnector"), _info("NixlConnector", block_size=64))
    fp8 = {"tensors": [["float8_e4m3fn", [8, 128]]] * 4, "fp8_scales": [1.0, 1.0]}
    assert "caches differ" in pairing_mismatch(_info(), _info(role="kv_consumer", layout=fp8))
    half_heads = {"tensors": [["bfloat16", [4, 128]]] * 4, "fp8_scales": [1.0, 1.0]}  # a rank of tp=2
    assert "caches differ" in pairing_mismatch(_info(), _info(role="kv_consumer", layout=half_heads))
    assert pairing_mismatch(_info("DeviceIpcConnector"), _info("DeviceIpcConnector", "kv_consumer",
                                                               layout=half_heads)) is None


def _pools(answers: dict):
    """A prefill and a decode pool behind the proxy (which sets their admission), and a client whose
    instances answer /health, /metrics and /kv_transfer from answers (url -> (status, body))."""
    def handle(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/kv_transfer":
            status, body = answers[base]
            return httpx.Response(status, json=body)
        return httpx.Response(200, text="")
    prefill = BackendPool(["http://p1:1", "http://p2:1", "http://p3:1"])
    decode = BackendPool(["http://d1:1", "http://d2:1", "http://d3:1"])
    build_pd_proxy_app(prefill, decode)
    return prefill, decode, httpx.AsyncClient(transport=httpx.MockTransport(handle))


def test_the_proxy_keeps_out_instances_that_cannot_pair_and_says_why(caplog):
    answers = {"http://p1:1": (200, {"kv_transfer": _info()}),
               "http://p2:1": (200, {"kv_transfer": _info(role="kv_consumer")}),  # a decode instance by mistake
               "http://p3:1": (200, {"kv_transfer": None}),  # started without --kv-transfer-config
               "http://d1:1": (200, {"kv_transfer": _info(role="kv_consumer", block_size=64)}),
               "http://d2:1": (200, {"kv_transfer": _info("NixlConnector", "kv_consumer")}),
               "http://d3:1": (404, {"detail": "Not Found"})}  # not a sageInfer instance: unchecked
    prefill, decode, client = _pools(answers)

    async def check_all():
        for pool in (prefill, decode):
            for backend in pool.backends:
                await pool.check(client, backend)
        await client.aclose()
    with caplog.at_level("WARNING"):
        asyncio.run(check_all())
    assert [b.url for b in prefill.healthy()] == ["http://p1:1"]
    assert [b.url for b in decode.healthy()] == ["http://d1:1", "http://d3:1"]
    refused = {b.url: b.refused for pool in (prefill, decode) for b in pool.backends if b.refused}
    assert "kv_role is kv_consumer" in refused["http://p2:1"] and "no --kv-transfer-config" in refused["http://p3:1"]
    assert "different connectors" in refused["http://d2:1"] and "http://p1:1" in refused["http://d2:1"]
    assert "kept out of rotation" in caplog.text and "http://d3:1 has no /kv_transfer" in caplog.text


def test_a_refused_instance_is_taken_once_it_comes_back_able_to_pair():
    answers = {"http://p1:1": (200, {"kv_transfer": _info(role="kv_consumer")})}
    prefill, _, client = _pools(answers)
    backend = prefill.backends[0]

    async def check_twice():
        await prefill.check(client, backend)
        refused = backend.refused
        answers["http://p1:1"] = (200, {"kv_transfer": _info()})  # restarted as a producer
        await prefill.check(client, backend)
        await client.aclose()
        return refused
    assert "kv_role" in asyncio.run(check_twice())
    assert backend.healthy and backend.refused is None and backend.kv_transfer["kv_role"] == "kv_producer"
