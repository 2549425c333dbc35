"""Prefill/decode separation served: a prefill and a decode instance and `sageinfer proxy` on
loopback answer as one instance does (streaming too), the KV really comes over, and a prefill
instance that dies leaves the decode instance computing the prompt itself."""
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from ranks import needs_ranks
from server_util import CliProcess, ServerProcess, free_port, free_port_run, labelled_counter, parse_metrics

CONNECTORS = ["DeviceIpcConnector", "SharedMemoryConnector", "NixlConnector", "TorchDistributedConnector"]
# The paths a prompt's KV may take with each (sageinfer:kv_transfer_sends_total's `via`).
SEND_PATHS = {"DeviceIpcConnector": {"device_ipc"},
              "SharedMemoryConnector": {"region", "region_layer_by_layer", "region_after_wait"},
              "NixlConnector": {"nixl"}, "TorchDistributedConnector": {"torch_distributed"}}


class ProxyProcess(CliProcess):
    def __init__(self, prefill: list[str], decode: list[str], command: str = "proxy", *extra: str):
        """command: `proxy`, or `router` given PD pools (the same front door)."""
        super().__init__(command, "--prefill", *prefill, "--decode", *decode, *extra)

    def paths(self) -> dict[str, float]:
        return self.counter("sageinfer_pd_proxy:requests", "path")


@pytest.fixture(scope="module", params=CONNECTORS)
def pd(request, llama_dir, tmp_path_factory):
    if request.param == "NixlConnector":
        try:
            from sageinfer.transport.nixl_connector import _nixl_api
            _nixl_api()
        except ImportError:
            pytest.skip("NIXL is not installed")
    shm = str(tmp_path_factory.mktemp("shm"))

    def config(role):
        return json.dumps({"kv_connector": request.param, "kv_role": role,
                           "kv_connector_extra_config": {"shm_dir": shm, "ipc_dir": shm, "staging_gb": 0.03}})
    prefill = ServerProcess(llama_dir, "--kv-transfer-config", config("kv_producer"), api_key=None)
    decode = ServerProcess(llama_dir, "--kv-transfer-config", config("kv_consumer"), api_key=None)
    proxy = ProxyProcess([prefill.base_url], [decode.base_url], "router" if request.param == "NixlConnector" else "proxy")
    yield prefill, decode, proxy
    proxy.stop()
    decode.stop()
    prefill.stop()


PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest where"


def _metrics(server) -> dict:
    return parse_metrics(httpx.get(server.base_url + "/metrics", timeout=10).text)


def test_proxy_answers_as_one_instance_with_the_kv_moved(pd):
    """Each prompt goes through the proxy first (the decode instance has never seen it, so its KV can
    only come from the prefill instance), then straight to the decode instance for the reference."""
    prefill, decode, proxy = pd
    described = [httpx.get(s.base_url + "/kv_transfer", timeout=10).json()["kv_transfer"] for s in (prefill, decode)]
    assert [d["kv_role"] for d in described] == ["kv_producer", "kv_consumer"]
    assert described[0]["kv_connector"] == described[1]["kv_connector"] and described[0]["layout"]["tensors"]
    deadline = time.monotonic() + 10
    while True:  # both admitted (the proxy's health checks run every second), none refused
        paired = httpx.get(proxy.base_url + "/pd/instances", timeout=10).json()
        if all(b["healthy"] for side in paired.values() for b in side) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert all(b["healthy"] and b["refused"] is None for side in paired.values() for b in side), paired
    direct = openai.OpenAI(base_url=decode.base_url + "/v1", api_key="none", max_retries=0)
    via = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0)
    loads_before = _metrics(decode)["sageinfer:kv_transfer_loads_total"]
    sends_before = sum(labelled_counter(prefill.base_url, "sageinfer:kv_transfer_sends", "via").values())

    def args(tag):
        return dict(model="tiny", prompt=f"{tag}: {PROMPT}", max_tokens=10, temperature=0,
                    extra_body={"ignore_eos": True})
    got = via.completions.create(**args("plain")).choices[0].text
    assert got == direct.completions.create(**args("plain")).choices[0].text
    streamed = "".join(c.choices[0].text for c in via.completions.create(stream=True, **args("streamed")))
    assert streamed == direct.completions.create(**args("streamed")).choices[0].text
    chat_args = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
                     extra_body={"ignore_eos": True})
    got = via.chat.completions.create(**chat_args).choices[0].message.content
    assert got == direct.chat.completions.create(**chat_args).choices[0].message.content
    after = _metrics(decode)
    assert after["sageinfer:kv_transfer_loads_total"] - loads_before == 3
    assert after["sageinfer:kv_transfer_load_failures_total"] == 0
    assert after["sageinfer:kv_transfer_load_seconds_total"] > 0
    assert proxy.paths() == {"pd": 3.0}
    sends = labelled_counter(prefill.base_url, "sageinfer:kv_transfer_sends", "via")
    assert sum(sends.values()) - sends_before == 3, sends
    assert set(sends) <= SEND_PATHS[described[0]["kv_connector"]], sends
    # nothing stays held: every block free again on both sides
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gauges = [_metrics(s) for s in (prefill, decode)]
        if all(g["sageinfer:kv_cache_free_blocks"] == g["sageinfer:kv_cache_total_blocks"] for g in gauges):
            break
        time.sleep(0.2)
    for g in gauges:
        assert g["sageinfer:kv_cache_free_blocks"] == g["sageinfer:kv_cache_total_blocks"]
    assert gauges[0]["sageinfer:kv_transfer_send_seconds_total"] > 0  # the prefill side held its blocks a while


def test_short_prompts_may_skip_the_prefill_instances(pd):
    """--max-local-prefill-tokens N: a prompt of at most N tokens (counted by a decode instance's
    /tokenize, or here for token ids) is computed by the decode instance itself; longer ones take the
    prefill instances. The answers are the same either way. The long prompts hold a whole KV block
    on every platform (64 tokens on CUDA), so that each has KV to move."""
    prefill, decode, _ = pd
    proxy = ProxyProcess([prefill.base_url], [decode.base_url], "proxy", "--max-local-prefill-tokens", "24")
    try:
        via = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0)
        direct = openai.OpenAI(base_url=decode.base_url + "/v1", api_key="none", max_retries=0)
        loads = _metrics(decode)["sageinfer:kv_transfer_loads_total"]
        cases = [("short text", "Hello there", "local_prefill"), ("long text", f"long: {PROMPT} {PROMPT}", "pd"),
                 ("short ids", list(range(5, 25)), "local_prefill"), ("long ids", list(range(5, 105)), "pd")]
        for _, prompt, _ in cases:
            args = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
            assert via.completions.create(**args).choices[0].text == direct.completions.create(**args).choices[0].text
        chat = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        via.chat.completions.create(**chat)
        assert proxy.paths() == {"local_prefill": 3.0, "pd": 2.0}
        assert _metrics(decode)["sageinfer:kv_transfer_loads_total"] - loads == 2
    finally:
        proxy.stop()


def test_bad_requests_get_the_instances_own_400(pd):
    _, _, proxy = pd
    resp = httpx.post(proxy.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": -1},
                      timeout=30)
    assert resp.status_code == 400 and "temperature" in resp.json()["error"]["message"]
    assert httpx.post(proxy.base_url + "/v1/completions", content=b"{not json", timeout=30).status_code == 400
    # A lone surrogate and a NaN reach the instance as the client wrote them (the proxy's own encoding had
    # raised on both: a 500), and the instance refuses them.
    for body, param in ((b'{"model": "tiny", "prompt": "x\\ud800", "max_tokens": 2}', "prompt"),
                        (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature")):
        resp = httpx.post(proxy.base_url + "/v1/completions", content=body, timeout=30,
                          headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and param in resp.text, resp.text


def test_a_dead_prefill_instance_leaves_decode_computing_the_prompt(pd):
    prefill, decode, proxy = pd
    direct = openai.OpenAI(base_url=decode.base_url + "/v1", api_key="none", max_retries=0)
    args = dict(model="tiny", prompt=PROMPT + " again", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    expected = direct.completions.create(**args).choices[0].text
    prefill.stop()
    via = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0)
    assert via.completions.create(**args).choices[0].text == expected
    assert proxy.paths().get("decode_only") == 1.0


def test_launch_pd_starts_prefill_and_decode_instances_behind_the_proxy(llama_dir, tmp_path):
    """`sageinfer launch --pd 1:2`: one prefill and two decode instances and the PD proxy, xPyD."""
    port, first = free_port(), free_port_run(3)
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sageinfer.gateway.cli", "launch", llama_dir, "--pd", "1:2",
                             "--port", str(port), "--first-instance-port", str(first), "--log-dir", str(tmp_path),
                             "--", "--dtype", "float32", "--num-gpu-blocks-override", "200", "--served-model-name",
                             "tiny"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                listed = httpx.get(base + "/pd/instances", timeout=2).json()
                if all(b["healthy"] for side in listed.values() for b in side) and len(listed["decode"]) == 2:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        texts = [client.completions.create(model="tiny", prompt=f"{i}: {PROMPT}", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text for i in range(4)]
        listed = httpx.get(base + "/pd/instances", timeout=2).json()
        assert [b["served"] for b in listed["decode"]] and sum(b["served"] for b in listed["decode"]) == 4
        direct = openai.OpenAI(base_url=listed["decode"][0]["url"] + "/v1", api_key="none", max_retries=0)
        assert texts[3] == direct.completions.create(model="tiny", prompt=f"3: {PROMPT}", max_tokens=6, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].text
        loads = sum(parse_metrics(httpx.get(b["url"] + "/metrics", timeout=10).text)["sageinfer:kv_transfer_loads_total"]
                    for b in listed["decode"])
        assert loads == 4
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


@needs_ranks(2)
@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 2), (1, 2), (2, 1)])
def test_tensor_parallel_instances_move_every_ranks_kv(llama_dir, tmp_path, prefill_tp, decode_tp):
    """Prefill and decode instances of tensor parallel sizes 1 or 2 (DeviceIpcConnector: the decode
    instance's rank 0 fills each of its ranks' KV heads from the prefill rank that holds them). The
    reference is the prefill instance computing the whole answer itself."""
    def config(role):
        return json.dumps({"kv_connector": "DeviceIpcConnector", "kv_role": role,
                           "kv_connector_extra_config": {"ipc_dir": str(tmp_path)}})
    servers = [ServerProcess(llama_dir, "--tensor-parallel-size", str(tp), "--kv-transfer-config", config(role),
                             api_key=None) for role, tp in (("kv_producer", prefill_tp), ("kv_consumer", decode_tp))]
    proxy = ProxyProcess([servers[0].base_url], [servers[1].base_url])
    try:
        reference = openai.OpenAI(base_url=servers[0].base_url + "/v1", api_key="none", max_retries=0)
        via = openai.OpenAI(base_url=proxy.base_url + "/v1", api_key="none", max_retries=0)
        for tag in ("first", "second"):
            args = dict(model="tiny", prompt=f"{tag}: {PROMPT} {PROMPT}", max_tokens=10, temperature=0,
                        extra_body={"ignore_eos": True})
            assert via.completions.create(**args).choices[0].text == reference.completions.create(**args).choices[0].text
        loaded = _metrics(servers[1])
        assert loaded["sageinfer:kv_transfer_loads_total"] == 2 and loaded["sageinfer:kv_transfer_load_failures_total"] == 0
        assert proxy.paths() == {"pd": 2.0}
    finally:
        proxy.stop()
        for server in servers:
            server.stop()
