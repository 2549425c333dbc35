"""KV cache events: an engine publishes over ZMQ what its prefix cache gains and drops, keyed by the
prefix cache's own block hashes, and answers snapshots of what it holds; the stream and the
snapshots must agree with the block pool at every point."""
import json
import socket
import time

import pytest
import zmq

from sageinfer import LLM, SamplingParams
from sageinfer.kv_cache.manager import hash_block
from sageinfer.router.kv_index import InstanceBlocks, KVEventIndex, prompt_hashes
from sageinfer.transport.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, decode_batch,
                                           events_from_changes, parse_kv_events_config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_changes_become_events_and_chains_merge():
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    events = events_from_changes([("stored", a, None, [1, 2]), ("stored", b, a, [3, 4]), ("removed", c),
                                  ("removed", a), ("stored", c, None, [5, 6]), ("cleared",)], block_size=2)
    assert events == [BlockStored([a, b], None, [1, 2, 3, 4], 2), BlockRemoved([c, a]),
                      BlockStored([c], None, [5, 6], 2), AllBlocksCleared()]


def test_the_config_takes_vllms_fields_and_refuses_others():
    assert parse_kv_events_config(None) is None
    assert parse_kv_events_config('{"enable_kv_cache_events": false}') is None
    config = parse_kv_events_config('{"enable_kv_cache_events": true, "endpoint": "tcp://*:6000"}')
    assert config["replay_endpoint"] == "tcp://*:6001" and parse_kv_events_config(config) == config
    with pytest.raises(ValueError, match="unknown field"):
        parse_kv_events_config('{"enable_kv_cache_events": true, "port": 1}')
    with pytest.raises(ValueError, match="publisher"):
        parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "kafka"}')
    with pytest.raises(ValueError, match="prefix caching"):
        LLM("unused", kv_events_config='{"enable_kv_cache_events": true}', enable_prefix_caching=False)


class _Listener:
    """A subscriber as a router runs one: the stream, and snapshots on request."""

    def __init__(self, config: dict):
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(config["endpoint"])
        self.replay = config["replay_endpoint"]
        self.last_seq = 0
        self.state = InstanceBlocks()
        time.sleep(0.3)  # a SUB socket misses what is sent before it has joined

    def drain(self, seconds: float = 1.0) -> list:
        """Events that arrive within the time, applied to the listener's copy (in order, no gap)."""
        events, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.sub.poll(50):
                _, seq, payload = self.sub.recv_multipart()
                seq = int.from_bytes(seq, "big")
                assert seq == self.last_seq + 1, (seq, self.last_seq)
                self.last_seq = seq
                batch = decode_batch(payload)
                self.state.apply(batch)
                events += batch.events
        return events

    def snapshot(self) -> tuple[int, set]:
        dealer = self.context.socket(zmq.DEALER)
        dealer.connect(self.replay)
        dealer.send_multipart([b"", b"snapshot"])
        assert dealer.poll(5000)
        _, seq, payload = dealer.recv_multipart()
        dealer.close(linger=0)
        state = InstanceBlocks()
        state.apply(decode_batch(payload))
        return int.from_bytes(seq, "big"), state

    def close(self):
        self.context.destroy(linger=0)


def test_the_engine_publishes_what_its_prefix_cache_gains_and_drops(llama_dir):
    config = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{_free_port()}",
              "replay_endpoint": f"tcp://127.0.0.1:{_free_port()}"}
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=20, block_size=16, max_model_len=256,
              kv_events_config=json.dumps(config), show_progress=False)
    listener = _Listener(parse_kv_events_config(config))
    pool = llm.engine.kv_manager.pool
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        prompt = list(range(10, 80))  # 70 tokens: 4 full blocks, 74 with the generated ones
        llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)
        stored = [e for e in listener.drain() if isinstance(e, BlockStored)]
        chain = prompt_hashes(prompt + [0], 16)  # the 4 blocks of the prompt's first 64 tokens
        assert [h for e in stored for h in e.block_hashes] == chain
        assert stored[0].parent_block_hash is None and stored[0].token_ids[:16] == prompt[:16]
        assert chain[1] == hash_block(chain[0], prompt[16:32])  # the engine's own keys, recomputable
        assert listener.state.blocks("GPU") == set(pool.cached)
        seq, held = listener.snapshot()
        assert seq == listener.last_seq and held.blocks("GPU") == set(pool.cached)

        # Other prompts through a 19-block cache evict blocks of the first prompt, and say so.
        for start in (100, 200, 300):
            llm.generate({"prompt_token_ids": list(range(start, start + 90))}, greedy, use_tqdm=False)
        removed = {h for e in listener.drain() if isinstance(e, BlockRemoved) for h in e.block_hashes}
        evicted = set(chain) - set(pool.cached)  # leaves go first: the prompt's last blocks at least
        assert evicted and evicted <= removed
        assert listener.state.blocks("GPU") == set(pool.cached)
        assert listener.snapshot()[1].blocks("GPU") == set(pool.cached)

        pool.reset_prefix_cache()  # cleared: one event says so
        llm.engine.step()
        assert any(isinstance(e, AllBlocksCleared) for e in listener.drain()) and not listener.state.blocks("GPU")
    finally:
        listener.close()
        llm.engine.shutdown()


def test_a_port_in_use_is_a_clear_error(llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{port}"}
        with pytest.raises(ValueError, match="cannot bind"):
            LLM(llama_dir, dtype="float32", num_gpu_blocks_override=20, max_model_len=256,
                kv_events_config=json.dumps(config),
                show_progress=False)


def test_the_offload_tier_publishes_its_blocks_too(llama_dir):
    """Blocks evicted to host memory stay prefix hits there: they are published as held on the CPU,
    and a router counts them (the device index alone would say they are gone)."""
    config = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{_free_port()}",
              "replay_endpoint": f"tcp://127.0.0.1:{_free_port()}"}
    llm = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=20, block_size=16, max_model_len=256,
              kv_offload_gb=0.001, kv_events_config=json.dumps(config), show_progress=False)
    listener = _Listener(parse_kv_events_config(config))
    manager, greedy = llm.engine.kv_manager, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        first = list(range(10, 80))
        for prompt in (first, *(list(range(s, s + 90)) for s in (100, 200, 300))):
            llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)
        listener.drain()
        host = set(manager.connector.slots)
        assert host and listener.state.blocks("CPU") == host
        assert listener.state.blocks("GPU") == set(manager.pool.cached)
        assert listener.snapshot()[1].blocks("CPU") == host
        chain = prompt_hashes(first + [0], 16)
        assert set(chain) - set(manager.pool.cached) <= host  # what left the device went to the host
        index = KVEventIndex()
        index.instances["a"] = listener.state
        listener.state.synced = True
        assert index.match(first + [0], ["a"]) == {"a": 64}  # all 4 blocks: on the device or the host
    finally:
        listener.close()
        llm.engine.shutdown()


def test_the_prefix_policy_follows_reported_blocks_and_the_load():
    """Without a tokenizer, token-id prompts are measured against the instances' reported blocks;
    the instance holding more of the prefix wins unless it is far busier; text goes by the router's
    own record."""
    from sageinfer.router.backends import Backend
    from sageinfer.router.policies import PREFIX_BALANCE_SLACK, Policy
    policy = Policy("prefix", kv_events=True)
    decisions = []
    policy.on_decision = lambda reason, hit, total: decisions.append((reason, hit, total))
    a, b = Backend("http://a", healthy=True), Backend("http://b", healthy=True)
    prompt = list(range(100, 180))  # 80 tokens: 4 blocks of 16 can hit
    for url, blocks in (("http://a", 1), ("http://b", 3)):
        state = policy.kv_index.instances[url] = InstanceBlocks(block_size=16, synced=True)
        state.media["GPU"] = set(prompt_hashes(prompt, 16)[:blocks])
    assert policy.pick([a, b], None, {"prompt": prompt}) is b and decisions[-1] == ("prefix", 48, 80)
    b.in_flight = PREFIX_BALANCE_SLACK + 1  # far busier than a: the load wins
    assert policy.pick([a, b], None, {"prompt": prompt}) is a and decisions[-1][0] == "least_load"
    policy.pick([a, b], None, {"prompt": "a text prompt"})  # no tokenizer: the router's own record
    assert decisions[-1] == ("least_load", 0, 0)


def test_the_router_index_follows_a_publisher_and_resyncs_after_a_gap():
    """The router's subscription: a snapshot first, then the stream; a gap in the sequence numbers
    (a dropped message) makes it start over from a snapshot, so it ends equal to the publisher."""
    import asyncio

    from sageinfer.transport.kv_events import KVEventPublisher

    config = parse_kv_events_config({"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{_free_port()}",
                                     "replay_endpoint": f"tcp://127.0.0.1:{_free_port()}"})
    publisher = KVEventPublisher(config, block_size=16)
    a, b, c = (hash_block(None, [i] * 16) for i in range(3))

    async def scenario():
        index = KVEventIndex()
        publisher.publish([("stored", a, None, [0] * 16)])  # before the router came: in its snapshot
        await asyncio.sleep(0.1)
        index.follow("http://127.0.0.1:1", {"endpoint": config["endpoint"].replace("127.0.0.1", "*"),
                                          "replay_endpoint": config["replay_endpoint"], "block_size": 16})

        async def until(condition):
            for _ in range(100):
                if condition():
                    return True
                await asyncio.sleep(0.05)
            return False
        state = index.instances["http://127.0.0.1:1"]
        assert await until(lambda: state.synced and state.blocks("GPU") == {a})
        await asyncio.sleep(0.3)  # the subscription has joined
        publisher.publish([("stored", b, None, [1] * 16)])
        assert await until(lambda: state.blocks("GPU") == {a, b})
        real = publisher.pub
        publisher.pub = _Dropping(real)  # the next batch is lost on the way (as a full queue drops it)
        publisher.publish([("removed", a)])
        assert await until(lambda: publisher.pub.dropped)
        publisher.pub = real
        publisher.publish([("stored", c, None, [2] * 16)])
        # only a snapshot can tell the router that a went: the gap makes it take one
        assert await until(lambda: state.synced and state.blocks("GPU") == {b, c})
        assert index.match([2] * 16 + [9], ["http://127.0.0.1:1"]) == {"http://127.0.0.1:1": 16}
        await index.close()

    try:
        asyncio.run(scenario())
    finally:
        publisher.close()


class _Dropping:
    """A PUB socket that loses what it is given."""

    def __init__(self, socket):
        self.socket, self.dropped = socket, 0

    def send_multipart(self, frames):
        self.dropped += 1


def test_the_router_index_follows_an_instance_anew_when_its_endpoints_change():
    """An instance started again by a launcher publishes on ports chosen at that start: the same answer
    keeps the subscription, other endpoints replace it (and what the index knew of the instance)."""
    import asyncio

    async def scenario():
        index = KVEventIndex()
        url = "http://127.0.0.1:1"
        first = {"endpoint": f"tcp://127.0.0.1:{_free_port()}", "replay_endpoint": f"tcp://127.0.0.1:{_free_port()}",
                 "block_size": 16}
        index.follow(url, first)
        task, state = index._tasks[url], index.instances[url]
        index.follow(url, dict(first))
        assert index._tasks[url] is task and index.instances[url] is state
        moved = dict(first, endpoint=f"tcp://127.0.0.1:{_free_port()}")
        index.follow(url, moved)
        await asyncio.sleep(0)
        assert task.cancelled() and index._tasks[url] is not task and index.instances[url] is not state
        assert index.is_following(url)
        await index.close()
        assert not index.instances

    asyncio.run(scenario())


def test_launched_instances_take_new_event_ports_at_each_start(monkeypatch, tmp_path):
    """A local instance's --kv-events-config is chosen when it starts, so a start after an exit does
    not ask again for ports another process may have bound meanwhile (the case that kept an instance
    down: another instance's snapshot socket had taken the port chosen for its events)."""
    from sageinfer.router import launcher

    started = []

    class FakeProcess:
        pid = 1

        def __init__(self, args, **kwargs):
            started.append(args)

        def poll(self):
            return None

    monkeypatch.setattr(launcher.subprocess, "Popen", FakeProcess)
    instance = launcher.Instance(["serve", "model"], 9000, None, str(tmp_path), kv_events=True)
    instance.start()
    instance.start()
    configs = [json.loads(args[args.index("--kv-events-config") + 1]) for args in started]
    assert all(c["enable_kv_cache_events"] and c["endpoint"].startswith("tcp://127.0.0.1:") for c in configs)
    assert configs[0] != configs[1]  # fresh ports (the chance of drawing the same two again is negligible)
    plain = launcher.Instance(["serve", "model"], 9001, None, str(tmp_path))
    plain.start()
    assert "--kv-events-config" not in started[-1]
