"""The router over tiny instances on loopback: answers as the instances do, spreads the load by its
policy, keeps sessions together, and routes around an instance that dies."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_util import CliProcess, ServerProcess, free_port, free_port_run


class RouterProcess(CliProcess):
    def __init__(self, backends: list[str], policy: str):
        super().__init__("router", "--policy", policy, *[a for url in backends for a in ("--backend", url)])

    def served(self) -> dict[str, float]:
        return self.counter("sageinfer_router:requests", "backend")


# Routing needs no decode graphs: eager instances start in seconds on a GPU too (capture takes ~30 s).
EAGER = "--enforce-eager"


@pytest.fixture(scope="module")
def instances(llama_dir):
    servers = [ServerProcess(llama_dir, EAGER, api_key=None) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def _complete(base_url: str, prompt: str, max_tokens: int = 6, **extra) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True}, **extra)
    return out.choices[0].text


def test_round_robin_answers_as_the_instances_and_uses_both(instances):
    router = RouterProcess([s.base_url for s in instances], "round_robin")
    try:
        direct = _complete(instances[0].base_url, "The capital of")
        assert [_complete(router.base_url, "The capital of") for _ in range(4)] == [direct] * 4
        client = openai.OpenAI(base_url=router.base_url + "/v1", api_key="none", max_retries=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="The capital of", max_tokens=6, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert streamed == direct
        assert client.models.list().data[0].id == "tiny"
        served = router.served()
        assert sorted(served.values()) == [2, 3]
    finally:
        router.stop()


def test_an_instances_load_is_the_routers_open_requests_plus_others_reported():
    """A report lags by a check interval: the router's own requests that ended since it was read no
    longer count (they made least-load send a burst all to one instance under a loaded machine),
    while work the instance reported beyond this router's (other clients') still does."""
    from sageinfer.router.backends import Backend
    b = Backend("http://x", reported_load=8, in_flight_at_report=8)
    assert b.load == 0  # all eight were ours and have ended
    b.in_flight = 3
    assert b.load == 3
    b.reported_load, b.in_flight_at_report = 6, 2  # four of another client's at the last report
    assert b.load == 7


def test_least_load_spreads_concurrent_requests_and_sessions_stay_together(instances):
    router = RouterProcess([s.base_url for s in instances], "least_load")
    try:
        # 16 requests, 8 at a time, long enough that each wave is in flight together: the first eight
        # split evenly whatever the instances' speeds (on a loaded machine one may be slower, and the
        # rest then rightly go more to the other)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: _complete(router.base_url, f"prompt {i}", max_tokens=48), range(16)))
        assert min(router.served().values()) >= 4
    finally:
        router.stop()
    router = RouterProcess([s.base_url for s in instances], "session")
    try:
        for user in ("alice", "bob", "carol", "dave"):
            before = router.served()
            for _ in range(3):
                _complete(router.base_url, "hi", user=user)
            after = router.served()
            assert sorted(after[b] - before.get(b, 0) for b in after) in ([0, 3], [3])  # all on one instance
    finally:
        router.stop()


def test_an_instance_that_dies_is_routed_around_and_rejoins(llama_dir):
    a, b = ServerProcess(llama_dir, EAGER, api_key=None), ServerProcess(llama_dir, EAGER, api_key=None)
    router = RouterProcess([a.base_url, b.base_url], "round_robin")
    try:
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        # Right after the kill the router may still pick it: the request moves to the live one.
        for i in range(6):
            _complete(router.base_url, f"after {i}")  # raises if any request fails
        deadline = time.monotonic() + 5
        while httpx.get(router.base_url + "/metrics").text.count('backend_healthy{backend="' + a.base_url + '"} 0.0') == 0:
            assert time.monotonic() < deadline, "the dead instance is still in rotation"
            time.sleep(0.2)
        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.wait()
        time.sleep(1.0)
        assert httpx.post(router.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 503
        a2 = ServerProcess(llama_dir, EAGER, api_key=None, port=a.port)  # back on its address
        try:
            deadline = time.monotonic() + 10
            while httpx.get(router.base_url + "/health").status_code != 200:
                assert time.monotonic() < deadline, "the restarted instance did not rejoin"
                time.sleep(0.2)
            _complete(router.base_url, "back")
        finally:
            a2.stop()
    finally:
        router.stop()
        a.stop()
        b.stop()


def test_prefix_policy_sends_a_shared_prefix_where_it_is_cached(instances):
    """Three conversations that each revisit a long prefix, interleaved: round robin computes each
    prefix on both instances, the prefix policy on one (prefix-cache hits read from the instances)."""
    def hits():
        return sum(s.metrics().get("sageinfer:prefix_cache_hits_total", 0) for s in instances)

    gained = {}
    for policy in ("round_robin", "prefix"):
        router = RouterProcess([s.base_url for s in instances], policy)
        try:
            prefixes = [f"{policy} conversation {g}: " + "the quick brown fox jumps over the lazy dog " * 15
                        for g in range(3)]
            before = hits()
            for turn in range(4):
                for prefix in prefixes:
                    _complete(router.base_url, prefix + f"turn {turn}")
            gained[policy] = hits() - before
        finally:
            router.stop()
    assert gained["prefix"] > 1.3 * gained["round_robin"], gained


def test_prefix_policy_follows_the_blocks_the_instances_report(llama_dir):
    """Instances publish their KV events; the router tokenizes each request as they do and sends it
    where the most of its prefix is cached: prompts and chats that revisit their prefix hit the
    cache more than under round robin, and the router's expected hits are real hits."""
    def events_config():
        return json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{free_port()}",
                           "replay_endpoint": f"tcp://127.0.0.1:{free_port()}"})
    servers = [ServerProcess(llama_dir, EAGER, "--kv-events-config", events_config(), api_key=None) for _ in range(2)]
    urls = [s.base_url for s in servers]
    try:
        def hits():
            return sum(s.metrics().get("sageinfer:prefix_cache_hits_total", 0) for s in servers)

        gained = {}
        for policy in ("round_robin", "prefix"):
            extra = ("--tokenizer", llama_dir) if policy == "prefix" else ()
            router = CliProcess("router", "--policy", policy, *extra, *[a for u in urls for a in ("--backend", u)])
            try:
                if policy == "prefix":
                    deadline = time.monotonic() + 20
                    while not all(v["synced"] for v in httpx.get(router.base_url + "/router/kv_index").json().values()):
                        assert time.monotonic() < deadline, "the router did not sync with the instances' events"
                        time.sleep(0.2)
                prefixes = [f"{policy} conversation {g}: " + "the quick brown fox jumps over the lazy dog " * 15
                            for g in range(2)]  # and a chat: three a turn, so round robin moves each
                chat = openai.OpenAI(base_url=router.base_url + "/v1", api_key="none", max_retries=0)
                history = [{"role": "system", "content": f"{policy}: " + "you answer briefly and well. " * 20}]
                before = hits()
                for turn in range(4):
                    for prefix in prefixes:
                        _complete(router.base_url, prefix + f"turn {turn}")
                        time.sleep(0.05)  # the events of the last request reach the router
                    history.append({"role": "user", "content": f"question {turn}"})
                    answer = chat.chat.completions.create(model="tiny", messages=history, max_tokens=4,
                                                          temperature=0).choices[0].message.content
                    history.append({"role": "assistant", "content": answer})
                gained[policy] = hits() - before
                if policy == "prefix":
                    reasons = router.counter("sageinfer_router:routing_decisions", "reason")
                    metrics = httpx.get(router.base_url + "/metrics").text
                    expected = float(re.search(r"^sageinfer_router:prefix_hit_tokens_total (\S+)", metrics, re.M)[1])
                    index = httpx.get(router.base_url + "/router/kv_index").json()
            finally:
                router.stop()
        assert gained["prefix"] > 1.3 * gained["round_robin"], gained
        assert reasons.get("prefix", 0) >= 9, reasons  # each text prefix and the chat after its first turn
        # what the router expected to hit, the instances did hit (they may hit more: blocks of the
        # current turn's own earlier tokens, or blocks the router had not heard of yet)
        assert 0.8 * gained["prefix"] <= expected <= gained["prefix"], (expected, gained)  # equal when run here
        assert set(index) == set(urls) and all(v["blocks"] > 0 and v["block_size"] for v in index.values())
    finally:
        for s in servers:
            s.stop()


def test_instances_join_and_leave_at_run_time(instances):
    router = RouterProcess([instances[0].base_url], "round_robin")
    try:
        added = httpx.post(router.base_url + "/router/backends", json={"url": instances[1].base_url})
        assert added.status_code == 200 and added.json()["backends"] == 2
        deadline = time.monotonic() + 5
        while not all(b["healthy"] for b in httpx.get(router.base_url + "/router/backends").json()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        for i in range(4):
            _complete(router.base_url, f"joined {i}")
        assert sorted(router.served().values()) == [2, 2]
        assert httpx.request("DELETE", router.base_url + "/router/backends",
                             json={"url": instances[0].base_url}).status_code == 200
        _complete(router.base_url, "one left")
        assert router.served()[instances[1].base_url] == 3
        assert httpx.post(router.base_url + "/router/backends", json={"url": "ftp://x"}).status_code == 400
        assert httpx.request("DELETE", router.base_url + "/router/backends",
                             json={"url": "http://nowhere:1"}).status_code == 404
    finally:
        router.stop()


BAD_INSTANCE_URLS = ["http://[::1", "http://\ud800", "http://a b", "http://", "http://:80", "http://h\x00x",
                     "http://127.0.0.1:99999", "ftp://x", 5]


def test_urls_that_name_no_instance_are_refused_and_routing_goes_on(instances):
    """The admin endpoint refuses what is not an instance URL with a 400 naming why (such URLs had entered the
    pool; their health checks raised errors the loop did not expect, and the router then answered 503 to every
    request); a valid URL of nothing is taken, marked down, and the others serve on."""
    router = RouterProcess([instances[0].base_url], "round_robin")
    try:
        for url in BAD_INSTANCE_URLS:
            answer = httpx.post(router.base_url + "/router/backends", content=json.dumps({"url": url}).encode(),
                                headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and "http(s)://host:port" in answer.json()["error"]["message"], url
        assert httpx.post(router.base_url + "/router/backends", json={"url": "http://127.0.0.1:1"}).status_code == 200
        time.sleep(1.0)  # a few health checks
        listed = {b["url"]: b["healthy"] for b in httpx.get(router.base_url + "/router/backends").json()}
        assert listed == {instances[0].base_url: True, "http://127.0.0.1:1": False}
        _complete(router.base_url, "still served")
        assert httpx.get(router.base_url + "/health").status_code == 200
    finally:
        router.stop()


def test_a_health_check_that_raises_marks_its_instance_down_and_the_loop_goes_on():
    """Whatever one instance's check raises, that instance is down and the others' checks go on."""
    import asyncio
    from sageinfer.router.backends import BackendPool

    class Client:
        async def get(self, url, timeout=None):
            if url.startswith("http://odd"):
                raise OverflowError("port out of range")
            return httpx.Response(200, text="", request=httpx.Request("GET", url))

    pool = BackendPool(["http://odd:1", "http://fine:2"])
    pool.backends[0].healthy = True

    async def checks():
        results = await asyncio.gather(*(pool.check(Client(), b) for b in pool.backends), return_exceptions=True)
        assert not any(isinstance(r, Exception) for r in results)
    asyncio.run(checks())
    assert [b.healthy for b in pool.backends] == [False, True]


def test_an_instance_moved_to_another_node_replaces_its_old_url_in_the_router(instances, monkeypatch):
    """A Ray instance whose node was lost starts again elsewhere: the launcher's on_moved takes the old
    URL out of the router's pool and puts the new one in (Ray and the move are stand-ins here)."""
    import types
    import sageinfer.executor.ray_ranks as ray_ranks
    from sageinfer.router.launcher import router_follows_moves
    from sageinfer.router.ray_instances import RayInstance

    placed = iter([(instances[0].base_url, "log"), (instances[1].base_url, "log")])
    actor = types.SimpleNamespace(start=types.SimpleNamespace(remote=lambda *a: next(placed)))
    fake_ray = types.SimpleNamespace(get=lambda ref, timeout=None: ref,
                                     remote=lambda **opts: (lambda cls: types.SimpleNamespace(remote=lambda: actor)))
    monkeypatch.setattr(ray_ranks, "ray_cluster", lambda: fake_ray)
    router = RouterProcess([instances[0].base_url], "round_robin")
    try:
        instance = RayInstance(["serve"], 0, 1, None, False, on_moved=router_follows_moves(router.base_url))
        instance.start()
        assert instance.url == instances[0].base_url
        instance.start()  # its actor was lost and the new one serves on another node
        assert instance.url == instances[1].base_url
        pool = httpx.get(router.base_url + "/router/backends").json()
        assert [b["url"] for b in pool] == [instances[1].base_url]
    finally:
        router.stop()


def test_launch_starts_instances_and_the_router_and_restarts_a_dead_instance(llama_dir, tmp_path):
    from sageinfer.router.launcher import child_devices, device_groups, with_peers_visible
    assert device_groups(0, 3, 1) == [None, None, None]
    assert device_groups(4, 2, 2) == ["0,1", "2,3"] and device_groups(2, 3, 1) == ["0", "1", "0"]
    with pytest.raises(ValueError, match="needs 2 devices"):
        device_groups(1, 1, 2)
    # PD over DeviceIpcConnector: own devices first (the ranks use those), the peers' after them
    assert with_peers_visible(["0,1", "2,3"], 4) == ["0,1,2,3", "2,3,0,1"] and with_peers_visible([None], 0) == [None]
    # a launcher that itself sees only some devices names them to its instances as it sees them
    assert child_devices("0,1", "4,5,6,7") == "4,5" and child_devices("1", None) == "1"
    assert child_devices("1,0", "GPU-a, GPU-b") == "GPU-b,GPU-a"
    port, first = free_port(), free_port_run(2)
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sageinfer.gateway.cli", "launch", llama_dir, "--instances", "2",
                             "--port", str(port), "--first-instance-port", str(first), "--policy", "round_robin",
                             "--log-dir", str(tmp_path), "--", "--dtype", "float32", "--num-gpu-blocks-override", "200",
                             "--served-model-name", "tiny"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def wait_all_healthy(seconds):
        deadline = time.monotonic() + seconds
        while True:
            try:
                listed = httpx.get(base + "/router/backends", timeout=2).json()
                if len(listed) == 2 and all(b["healthy"] for b in listed):
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.3)

    try:
        wait_all_healthy(120)
        for i in range(4):
            _complete(base, f"launched {i}")
        assert sorted(b["served"] for b in httpx.get(base + "/router/backends").json()) == [2, 2]
        started = re.findall(rf"instance on port {first} .*: process (\d+)", (tmp_path / "launcher.log").read_text())
        os.kill(int(started[-1]), signal.SIGKILL)
        _complete(base, "while one restarts")  # the other serves meanwhile
        time.sleep(1.0)
        wait_all_healthy(120)  # the launcher started it again and the router took it back
        assert len(re.findall(rf"instance on port {first} .*: process", (tmp_path / "launcher.log").read_text())) == 2
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    assert proc.returncode == 0


def test_launch_on_ray_places_instances_as_actors_and_the_router_follows_their_events(llama_dir, tmp_path):
    """`launch --ray` on a local Ray head (hosts of a cluster in production): each instance a Ray
    actor serving on its node's address and a port of that node, publishing KV events there; the
    prefix router follows them, and SIGTERM stops the instances with the launcher."""
    pytest.importorskip("ray")
    port = free_port()
    log = open(tmp_path / "launcher.log", "w")
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sageinfer.gateway.cli", "launch", llama_dir, "--instances", "2",
                             "--ray", "--port", str(port), "--", "--dtype", "float32", "--num-gpu-blocks-override", "200",
                             "--served-model-name", "tiny"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a Ray head, then two instances, on a 2-core machine
        while True:
            try:
                listed = httpx.get(base + "/router/backends", timeout=2).json()
                index = httpx.get(base + "/router/kv_index", timeout=2).json()
                if len(listed) == 2 and all(b["healthy"] for b in listed) and len(index) == 2:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        urls = [b["url"] for b in listed]
        assert len(set(urls)) == 2 and all(not u.startswith("http://127.0.0.1:" + str(port)) for u in urls)
        shared = "The same long opening of every request here, long enough for whole blocks " * 6
        answers = [_complete(base, shared + f"question {i}") for i in range(4)]
        assert all(isinstance(a, str) for a in answers)
        metrics = httpx.get(base + "/metrics").text
        hits = sum(float(v) for v in re.findall(r"^sageinfer_router:prefix_hit_tokens_total (\S+)", metrics, re.M))
        assert hits > 0, metrics  # the router saw the instances' stored blocks through their events
    finally:
        proc.terminate()
        proc.wait(90)
        log.close()
    assert proc.returncode == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    for url in urls:  # the actors' serve processes ended with the launcher
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
