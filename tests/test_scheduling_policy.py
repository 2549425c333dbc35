"""scheduling_policy "priority": the waiting line by priority (lowest first) then arrival, preemption of
the least urgent running request, and the priority of a request through LLM.generate and the server;
"fcfs" refuses priorities rather than ignore them."""
import httpx
import pytest

from sageinfer import LLM, SamplingParams
from sageinfer.config import EngineConfig
from sageinfer.engine.request import Request
from sageinfer.engine.request_queue import FcfsQueue, PriorityQueue, make_queue
from sageinfer.engine.scheduler import Scheduler
from sageinfer.kv_cache.manager import KVCacheManager
from server_util import ServerProcess


def _request(rid, priority=0, arrival=0.0, prompt_len=40, out_len=24):
    r = Request(rid, rid, 0, [5 + (len(rid) + j) % 300 for j in range(prompt_len)],
                SamplingParams(max_tokens=out_len, ignore_eos=True), set(), arrival_time=arrival, priority=priority)
    r.max_output_tokens = out_len
    return r


def _run(policy, requests, num_blocks=2048, budget=512, max_num_seqs=64):
    """Drive the scheduler alone (every scheduled token computed, one token sampled when a request has
    computed all it has); returns the order of first admission and each request's preemptions."""
    config = EngineConfig(model="unused", max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          scheduling_policy=policy, admission_lookahead_tokens=0)
    config.max_model_len = 4096
    kv = KVCacheManager(num_blocks, 4, enable_caching=False)
    sched = Scheduler(config, kv)
    for r in requests:
        sched.add_request(r)
    admitted = []
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update_after_step(out)
        for r, _ in out.scheduled:
            if r.request_id not in admitted:
                admitted.append(r.request_id)
            if r.num_computed_tokens == r.num_tokens:
                r.resolve_placeholder(r.append_placeholder(0), 7)
                if r.num_output_tokens >= r.max_output_tokens:
                    sched.finish(r, "length")
        kv.pool.check_accounting()
    return admitted, {r.request_id: r.num_preemptions for r in requests}


def test_waiting_requests_start_by_priority_then_arrival():
    def line():
        return [_request("a", 2, 0.0), _request("b", 0, 1.0), _request("c", 1, 2.0), _request("d", 0, 3.0)]
    # One request at a time (max_num_seqs 1): the order of admission is the line's order.
    assert _run("priority", line(), max_num_seqs=1)[0] == ["b", "d", "c", "a"]
    assert _run("fcfs", line(), max_num_seqs=1)[0] == ["a", "b", "c", "d"]


def test_preemption_takes_the_least_urgent_request_not_the_latest():
    """Two requests of 40 + 24 tokens in 24 blocks of 4 (room for 96 tokens, 128 wanted): one is
    preempted. Under fcfs it is the later arrival; under priority the one of the higher value, though it
    arrived first."""
    def pair():
        return [_request("early-low", 5, 0.0), _request("late-high", 0, 1.0)]
    _, fcfs = _run("fcfs", pair(), num_blocks=25)
    _, prio = _run("priority", pair(), num_blocks=25)
    assert fcfs["late-high"] > 0 and fcfs["early-low"] == 0
    assert prio["early-low"] > 0 and prio["late-high"] == 0


def test_priority_queue_puts_a_preempted_request_back_by_its_key():
    q = PriorityQueue()
    first, later, urgent = _request("first", 1, 0.0), _request("later", 1, 5.0), _request("urgent", 0, 9.0)
    for r in (later, urgent):
        q.add(r)
    q.add_front(first)  # preempted: it arrived before "later"
    assert [r.request_id for r in q] == ["urgent", "first", "later"] and len(q) == 3
    q.remove(first)
    assert first not in q and later in q and q.pop() is urgent and q.peek() is later
    f = FcfsQueue()
    f.add(later)
    f.add_front(first)
    assert [r.request_id for r in f] == ["first", "later"]
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_queue("lifo")


def test_llm_generate_takes_priorities_only_under_the_priority_policy(llama_dir):
    prompts = [{"prompt_token_ids": [3 + (5 * i + j) % 400 for j in range(20 + 7 * i)]} for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    fcfs = LLM(model=llama_dir, num_gpu_blocks_override=256, show_progress=False)
    expected = [list(o.outputs[0].token_ids) for o in fcfs.generate(prompts, params, use_tqdm=False)]
    with pytest.raises(ValueError, match="priority scheduling policy"):
        fcfs.generate(prompts, params, use_tqdm=False, priority=[0, 1, 2])
    by_priority = LLM(model=llama_dir, num_gpu_blocks_override=256, show_progress=False,
                      scheduling_policy="priority", max_num_seqs=1)
    with pytest.raises(ValueError, match="3 prompts"):
        by_priority.generate(prompts, params, use_tqdm=False, priority=[0, 1])
    outs = by_priority.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    assert [list(o.outputs[0].token_ids) for o in outs] == expected  # in the prompts' order, the same tokens


def test_server_serves_waiting_requests_by_priority(llama_dir):
    """One sequence at a time: while a first request runs, a request of priority 5 and then one of -1
    arrive; the later one, more urgent, is served first. Both endpoints take the field."""
    import asyncio
    srv = ServerProcess(llama_dir, "--scheduling-policy", "priority", "--max-num-seqs", "1")

    async def run():
        done = []
        async with httpx.AsyncClient(base_url=srv.base_url, headers=srv.headers, timeout=120) as http:
            async def send(name, priority, max_tokens, delay):
                await asyncio.sleep(delay)
                resp = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hello there",
                                                                "max_tokens": max_tokens, "ignore_eos": True,
                                                                "priority": priority})
                assert resp.status_code == 200, resp.text
                done.append(name)
            await asyncio.gather(send("first", 0, 900, 0.0), send("low", 5, 4, 0.1), send("urgent", -1, 4, 0.2))
            chat = await http.post("/v1/chat/completions", json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "priority": 7})
            assert chat.status_code == 200, chat.text
        return done
    try:
        assert asyncio.run(run()) == ["first", "urgent", "low"]
    finally:
        assert srv.stop() == 0
