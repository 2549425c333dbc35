"""Prefill/decode separation at the engine level: a prefill engine (kv_producer) computes prompts and
hands their KV over, a decode engine (kv_consumer) loads it and generates; outputs must be those of
one engine alone, and no block may stay held on either side, whatever fails."""
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sageinfer import LLM, SamplingParams
from sageinfer.transport.shm_connector import ByteRanges, on_memory_filesystem

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _connector_config(connector, role, tmp_path, **extra):
    extra = dict(extra)
    if connector == "SharedMemoryConnector":
        extra.setdefault("shm_dir", str(tmp_path))
        extra.setdefault("staging_gb", 0.03)  # a region of 30 MiB: the tiny model's prompts fit many times
    if connector == "DeviceIpcConnector":
        extra.setdefault("ipc_dir", str(tmp_path))
    return json.dumps({"kv_connector": connector, "kv_role": role, "kv_connector_extra_config": extra})


def _engine(model, connector, role, tmp_path, block_size=16, **extra):
    return LLM(model, dtype="float32", num_gpu_blocks_override=96, block_size=block_size, max_model_len=512,
               show_progress=False,
               attention_backend="torch_ref", kv_transfer_config=_connector_config(connector, role, tmp_path, **extra))


def _prompts(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(20, 90, size=count)]


def _prefill(engine, prompts):
    outs = engine.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True}),
                           use_tqdm=False)
    if engine.engine.kv_transfer.name == "SharedMemoryConnector":
        _settle(engine)  # the files are complete before the tests meddle with them
    return [o.kv_transfer_params for o in outs]


def _decode(engine, prompts, params_list, sampling=GREEDY):
    requests = []
    for prompt, params in zip(prompts, params_list):
        p = sampling.clone_for_sample(0)
        p.kv_transfer_params = params
        requests.append(p)
    return [o.outputs[0].token_ids for o in engine.generate([{"prompt_token_ids": p} for p in prompts], requests,
                                                             use_tqdm=False)]


def _free_blocks(engine):
    return engine.engine.kv_manager.pool.num_free_blocks


def _settle(engine, seconds=5.0):
    """Step an idle engine until its transfers are done (the serving loop does this by itself)."""
    deadline = time.monotonic() + seconds
    while engine.engine.has_pending_transfers() and time.monotonic() < deadline:
        engine.engine.step()


def _backends():
    out = ["DeviceIpcConnector", "SharedMemoryConnector", "TorchDistributedConnector"]
    try:
        from sageinfer.transport.nixl_connector import _nixl_api
        _nixl_api()
        out.append("NixlConnector")
    except Exception:  # noqa: BLE001
        pass
    return out


@pytest.fixture(scope="module")
def reference(llama_dir):
    plain = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=96, block_size=16, show_progress=False,
                attention_backend="torch_ref")
    prompts = _prompts()
    return prompts, [o.outputs[0].token_ids for o in plain.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("connector", _backends())
def test_decode_with_transferred_kv_equals_one_engine(llama_dir, tmp_path, reference, connector):
    prompts, expected = reference
    prefill = _engine(llama_dir, connector, "kv_producer", tmp_path)
    decode = _engine(llama_dir, connector, "kv_consumer", tmp_path)
    free_p, free_d = _free_blocks(prefill), _free_blocks(decode)
    params = _prefill(prefill, prompts)
    assert all(p["do_remote_prefill"] and p["remote_num_tokens"] == len(q) // 16 * 16 for p, q in zip(params, prompts))
    assert _decode(decode, prompts, params) == expected
    sched = decode.engine.scheduler
    assert sched.num_remote_kv_loads == len(prompts) and sched.num_remote_kv_failures == 0
    # every prompt token but the last few came over: the decode engine computed only the rest
    assert sched.num_remote_kv_tokens == sum((len(q) - 1) // 16 * 16 for q in prompts)
    _settle(prefill)
    assert _free_blocks(prefill) == free_p and _free_blocks(decode) == free_d
    if connector == "SharedMemoryConnector":
        _assert_region_all_free(prefill, tmp_path)


def _assert_region_all_free(prefill, tmp_path):
    """Every staged range was read and given back; only the region itself is left."""
    producer = prefill.engine.kv_transfer
    producer.poll_sent()
    assert not producer.staged and producer.ranges.bytes_free == producer.ranges.size
    assert os.listdir(tmp_path / "sageinfer-kv") == [os.path.basename(producer.region_path)]


def test_without_a_staging_region_each_prompt_goes_through_a_file(llama_dir, tmp_path, reference):
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path, staging_gb=0)
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    params = _prefill(prefill, prompts)
    assert all("path" in p and "region" not in p for p in params)
    assert _decode(decode, prompts, params) == expected
    assert decode.engine.scheduler.num_remote_kv_failures == 0
    assert not os.listdir(tmp_path / "sageinfer-kv")  # every staged file was read and removed


class _Stepping:
    """Steps an engine in a thread of its own, as its serving loop would, while the test drives another."""

    def __init__(self, engine):
        self.engine, self.stop = engine, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            if self.engine.engine.has_pending_transfers():
                self.engine.engine.step()
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def test_a_full_region_makes_the_next_prompts_wait_for_room_and_reuses_ranges_read(llama_dir, tmp_path, reference):
    """A region with room for one prompt at a time: the others wait with their blocks held, each is
    staged once the range before it has been read (its offset then in the .ready marker), and the
    outputs are the same."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path)
    producer = prefill.engine.kv_transfer
    largest = max(len(p) for p in prompts) // 16 * 16 * sum(producer.token_bytes)
    producer.ranges = ByteRanges(ByteRanges.round_to_pages(largest))  # room for one prompt at a time
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    free_p = _free_blocks(prefill)
    outs = prefill.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(
        temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), use_tqdm=False)
    params = [o.kv_transfer_params for o in outs]
    assert all("region" in p for p in params) and any("offset" not in p for p in params)
    assert producer.waiting_for_room and _free_blocks(prefill) < free_p  # held while they wait
    with _Stepping(prefill):  # the prefill instance's loop stages each as the range before it is read
        assert _decode(decode, prompts, params) == expected
    assert decode.engine.scheduler.num_remote_kv_failures == 0
    assert producer.sends_via["region_after_wait"] == sum("offset" not in p for p in params)
    _settle(prefill)
    assert _free_blocks(prefill) == free_p
    _assert_region_all_free(prefill, tmp_path)
    again = _prefill(prefill, prompts[:1])  # the range read is taken again
    assert again[0].get("offset") == 0


def test_loads_waiting_for_kv_not_yet_staged_do_not_hold_up_loads_of_kv_that_is(llama_dir, tmp_path, reference):
    """One loading thread, a region with room for one prompt: the decode instance asks first for the
    prompt still waiting for room, then for the staged one. Only once the staged one has been read is
    there room for the other, so the load waiting for it must not occupy the thread meanwhile."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path)
    producer = prefill.engine.kv_transfer
    largest = max(len(p) for p in prompts[:2]) // 16 * 16 * sum(producer.token_bytes)
    producer.ranges = ByteRanges(ByteRanges.round_to_pages(largest))
    outs = prefill.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(
        temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), use_tqdm=False)
    params = [o.kv_transfer_params for o in outs]
    order = sorted(range(2), key=lambda i: "offset" in params[i])  # the waiting one first
    assert "offset" not in params[order[0]] and "offset" in params[order[1]]
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path, threads=1)
    start = time.monotonic()
    with _Stepping(prefill):
        got = _decode(decode, [prompts[i] for i in order], [params[i] for i in order])
    assert got == [expected[i] for i in order] and decode.engine.scheduler.num_remote_kv_failures == 0
    assert time.monotonic() - start < 30  # not after a load timeout (60 s)


def test_a_prompt_that_waits_for_room_too_long_is_not_sent_and_its_consumer_computes_it(llama_dir, tmp_path,
                                                                                     reference):
    """The region held by KV no one reads: a prompt waiting for room gives up after load_timeout_s, its
    blocks go, and the decode instance, told at once, computes the prompt itself."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path, load_timeout_s=1)
    producer = prefill.engine.kv_transfer
    largest = max(len(p) for p in prompts[:2]) // 16 * 16 * sum(producer.token_bytes)
    producer.ranges = ByteRanges(ByteRanges.round_to_pages(largest))
    free_p = _free_blocks(prefill)
    outs = prefill.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(
        temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), use_tqdm=False)
    params = [o.kv_transfer_params for o in outs]
    waiting = [i for i, p in enumerate(params) if "offset" not in p]
    assert len(waiting) == 1
    time.sleep(1.1)
    _settle(prefill, seconds=2)  # the one staged (never read) and the one that gave up: both blocks free
    assert not producer.waiting_for_room and producer.staged and _free_blocks(prefill) == free_p
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    i = waiting[0]
    assert _decode(decode, prompts[i:i + 1], params[i:i + 1]) == expected[i:i + 1]
    assert decode.engine.scheduler.num_remote_kv_failures == 1


def test_a_prompt_going_through_a_file_does_not_hold_up_those_through_the_region(llama_dir, tmp_path, reference):
    """Files are written on threads of their own: with one staging thread, a prompt whose file is still
    being written leaves the next prompt's region range to be staged and read meanwhile."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path, threads=1)
    producer = prefill.engine.kv_transfer
    release, stage_in_file = threading.Event(), producer._stage_in_file
    producer._stage_in_file = lambda *a: (release.wait(30), stage_in_file(*a))
    take, size = producer.ranges.take, producer.ranges.size
    producer.ranges.take, producer.ranges.size = (lambda n: None), 0  # a region that could never hold it
    params = []
    for i, prompt in enumerate(prompts[:2]):
        out = prefill.generate([{"prompt_token_ids": prompt}], SamplingParams(
            temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True}), use_tqdm=False)
        params.append(out[0].kv_transfer_params)
        producer.ranges.take, producer.ranges.size = take, size
    assert "path" in params[0] and "region" in params[1]
    ready = producer._marker(producer.engine_id, params[1]["key"]) + ".ready"
    deadline = time.monotonic() + 10
    while not os.path.exists(ready) and time.monotonic() < deadline:
        prefill.engine.step()
    assert os.path.exists(ready) and not os.path.exists(params[0]["path"])  # the file is still being written
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    assert _decode(decode, prompts[1:2], params[1:]) == expected[1:2]
    release.set()
    assert _decode(decode, prompts[:1], params[:1]) == expected[:1]
    assert decode.engine.scheduler.num_remote_kv_failures == 0


@pytest.mark.skipif(not on_memory_filesystem("/dev/shm"), reason="no /dev/shm in memory here")
def test_a_region_in_memory_is_page_locked_where_the_platform_can_and_carries_the_same_kv(llama_dir, reference):
    """/dev/shm (the default directory): on a GPU the region and the consumer's mapping of it are
    page-locked, so the copies run asynchronously on the copy streams; the outputs must not change."""
    import tempfile
    prompts, expected = reference
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm_dir:
        prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", shm_dir, staging_gb=0.03)
        decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", shm_dir)
        producer, consumer = prefill.engine.kv_transfer, decode.engine.kv_transfer
        params = _prefill(prefill, prompts)
        assert all("region" in p for p in params)
        assert _decode(decode, prompts, params) == expected
        on_gpu = producer.tensors[0].device.type == "cuda"
        assert producer.region_pinned == on_gpu
        assert [pinned for _, pinned, _ in consumer.mapped.values()] == [on_gpu]
        prefill.engine.shutdown()  # the region leaves /dev/shm with its producer
        decode.engine.shutdown()


def test_only_files_in_memory_count_as_page_lockable():
    assert on_memory_filesystem("/proc/self/mounts") is False  # procfs
    assert on_memory_filesystem("/sys") is False
    if on_memory_filesystem("/dev/shm"):
        assert on_memory_filesystem("/dev/shm/some/file/not/there/yet")


def _chunked_producer(llama_dir, tmp_path, **extra):
    """A producer whose steps compute 32 prompt tokens in all: prompts compute in chunks."""
    return LLM(llama_dir, dtype="float32", num_gpu_blocks_override=96, block_size=16, max_model_len=512,
               max_num_batched_tokens=32, show_progress=False, attention_backend="torch_ref",
               kv_transfer_config=_connector_config("SharedMemoryConnector", "kv_producer", tmp_path, **extra))


def _watch_staging(producer, fail_at_call=None):
    """Record the layers each step's copies ran for, and the blocks send() still had to copy itself;
    fail_at_call: the layer copies' n-th stream switch raises (a step whose copies break off)."""
    seen = {"layers": [], "left_for_send": 0, "calls": 0}
    stage_step, copy_out = producer.stage_step, producer._copy_out

    def watched_stage_step(parts):
        hook = stage_step(parts)
        if hook is None:
            return None
        layers = []
        seen["layers"].append(layers)
        return lambda i: (layers.append(i), hook(i))

    def watched_copy_out(buf, block_ids, *args):
        seen["left_for_send"] += len(block_ids)
        return copy_out(buf, block_ids, *args)
    producer.stage_step, producer._copy_out = watched_stage_step, watched_copy_out
    if fail_at_call is not None:
        context = producer.platform.copy_stream_context

        def failing(stream):
            seen["calls"] += 1
            if seen["calls"] == fail_at_call:
                raise RuntimeError("copy failed")
            return context(stream)
        producer.platform.copy_stream_context = failing
    return seen


@pytest.mark.parametrize("chunked", [False, True])
def test_kv_leaves_layer_by_layer_while_the_prompt_computes_and_decodes_the_same(llama_dir, tmp_path, reference,
                                                                                 chunked):
    prompts, expected = reference
    prefill = _chunked_producer(llama_dir, tmp_path) if chunked else _engine(
        llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path)
    producer = prefill.engine.kv_transfer
    seen = _watch_staging(producer)
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    free_p, free_d = _free_blocks(prefill), _free_blocks(decode)
    params = _prefill(prefill, prompts)
    assert all("region" in p for p in params)
    layers = list(range(len(producer.layer_tensors)))
    assert seen["layers"] and all(step == layers for step in seen["layers"])  # every layer, in order
    if chunked:  # 32 tokens a step: the prompts' blocks left over several steps
        assert len(seen["layers"]) > len(prompts)
    assert seen["left_for_send"] == 0  # every whole block had left by the time each prefill ended
    assert not producer.early
    assert _decode(decode, prompts, params) == expected
    assert decode.engine.scheduler.num_remote_kv_failures == 0
    _settle(prefill)
    assert _free_blocks(prefill) == free_p and _free_blocks(decode) == free_d
    _assert_region_all_free(prefill, tmp_path)


@pytest.mark.parametrize("how", ["a copy fails", "a graph runs the step"])
def test_blocks_whose_layer_copies_broke_off_are_copied_once_the_prefill_ends(llama_dir, tmp_path, reference, how):
    """(A chunk's blocks whose copies broke off go with the next chunk's; here every prompt computes in
    one step, so send() copies them.) A captured graph calls no hook at all."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path)
    producer, runner = prefill.engine.kv_transfer, prefill.engine.runner
    if how == "a copy fails":
        seen = _watch_staging(producer, fail_at_call=2)  # the step's second layer
    else:
        seen = _watch_staging(producer)
        execute = runner.execute
        runner.execute = lambda scheduled, prev=None, after_layer=None, **kw: execute(scheduled, prev, **kw)
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    params = _prefill(prefill, prompts)
    assert seen["left_for_send"] > 0
    assert _decode(decode, prompts, params) == expected
    assert decode.engine.scheduler.num_remote_kv_failures == 0
    _settle(prefill)
    _assert_region_all_free(prefill, tmp_path)


def test_a_prefill_aborted_or_preempted_after_early_staging_gives_its_range_back(llama_dir, tmp_path, reference):
    prompts, _ = reference
    prefill = _chunked_producer(llama_dir, tmp_path)
    producer, engine = prefill.engine.kv_transfer, prefill.engine
    free = _free_blocks(prefill)
    params = SamplingParams(temperature=0, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    long_prompt = list(range(3, 3 + 200))
    engine.add_request("aborted", {"prompt_token_ids": long_prompt}, params)
    engine.add_request("preempted", {"prompt_token_ids": long_prompt[::-1]}, params)
    for _ in range(3):
        engine.step()
    assert set(producer.early) == {"aborted-0"}  # the second waits behind the first's chunks
    engine.abort_request("aborted")
    assert not producer.early and producer.ranges.bytes_free == producer.ranges.size
    for _ in range(3):
        engine.step()
    victim = engine.requests["preempted"].children[0]
    assert producer.early["preempted-0"].blocks > 0
    engine.scheduler.running.remove(victim)
    engine.scheduler._preempt(victim)  # as when the cache runs out of blocks
    assert not producer.early and producer.ranges.bytes_free == producer.ranges.size
    while engine.has_unfinished_requests():  # it computes its prompt again, staging it again
        engine.step()
    _settle(prefill)
    assert _free_blocks(prefill) == free  # staged: the blocks are free, the range waits for a reader
    [(offset, size, _, _)] = producer.staged.values()
    assert producer.ranges.bytes_free == producer.ranges.size - ByteRanges.round_to_pages(size)


def test_byte_ranges_take_first_fit_pages_and_merge_what_is_given_back():
    ranges = ByteRanges(4096 * 10)
    a, b, c = ranges.take(100), ranges.take(4097), ranges.take(4096 * 3)
    assert (a, b, c) == (0, 4096, 4096 * 3) and ranges.bytes_free == 4096 * 4
    assert ranges.take(4096 * 5) is None
    ranges.give(b, 4097)
    assert ranges.take(4096 * 3) == 4096 * 6  # the hole of two pages is too small
    ranges.give(a, 100)
    assert ranges.free[0] == (0, 4096 * 3)  # a's page merged with b's two
    ranges.give(c, 4096 * 3)
    ranges.give(4096 * 6, 4096 * 3)
    assert ranges.free == [(0, 4096 * 10)]


def test_a_pair_on_one_device_goes_over_host_memory(llama_dir, tmp_path, reference, monkeypatch):
    """NCCL refuses two ranks on one GPU: instances that share a device pair over gloo instead."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "TorchDistributedConnector", "kv_producer", tmp_path, backend="nccl")
    decode = _engine(llama_dir, "TorchDistributedConnector", "kv_consumer", tmp_path, backend="nccl")
    platform = prefill.engine.kv_transfer.platform
    monkeypatch.setattr(type(platform), "device_uuid", lambda self, device: "GPU-one-and-the-same")
    assert prefill.engine.kv_transfer._pair_backend("GPU-another") == "nccl"
    assert _decode(decode, prompts, _prefill(prefill, prompts)) == expected
    assert decode.engine.scheduler.num_remote_kv_failures == 0


@pytest.mark.parametrize("connector,prefill_block,decode_block", [
    ("SharedMemoryConnector", 16, 8), ("DeviceIpcConnector", 16, 8), ("DeviceIpcConnector", 8, 32)])
def test_block_sizes_may_differ(llama_dir, tmp_path, reference, connector, prefill_block, decode_block):
    prompts, expected = reference
    prefill = _engine(llama_dir, connector, "kv_producer", tmp_path, block_size=prefill_block)
    decode = _engine(llama_dir, connector, "kv_consumer", tmp_path, block_size=decode_block)
    assert _decode(decode, prompts, _prefill(prefill, prompts)) == expected
    assert decode.engine.scheduler.num_remote_kv_loads == len(prompts)


@pytest.mark.parametrize("connector", _backends())
def test_kv_that_cannot_be_loaded_is_recomputed(llama_dir, tmp_path, reference, connector):
    """A decode instance that cannot get the KV (the prefill instance died, or its KV is gone)
    computes the prompt itself: the same outputs, and no block held on either side."""
    prompts, expected = reference
    prefill = _engine(llama_dir, connector, "kv_producer", tmp_path, abort_timeout_s=0.5)
    decode = _engine(llama_dir, connector, "kv_consumer", tmp_path, load_timeout_s=5)
    free_p, free_d = _free_blocks(prefill), _free_blocks(decode)
    params = _prefill(prefill, prompts)
    if connector == "SharedMemoryConnector":
        params[0]["offset"] = 1 << 40  # past the end of the region
        params[1]["region"] = params[1]["region"].replace("region-", "region-gone-")  # a region that is not there
    elif connector == "DeviceIpcConnector":
        params[0]["remote_key"] = "0" * 32  # an offer the prefill instance never made
        params[1]["remote_engine_id"] = "not-on-this-host"  # a prefill instance that is not there
    elif connector == "NixlConnector":
        params[0]["remote_block_ids"] = params[0]["remote_block_ids"][:1]  # offers too little
        params[1]["remote_agent_metadata"] = "bm90IGFuIGFnZW50"  # a prefill instance that is not there
    else:
        params[0]["remote_request_id"] = "never-offered"  # the prefill instance holds nothing for it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            params[1]["remote_port"] = s.getsockname()[1]  # a prefill instance that is not there
    params[2]["remote_layout"] = {"tensors": [["float16", [1, 1]]], "fp8_scales": [1.0]}  # another model
    assert _decode(decode, prompts, params) == expected
    sched = decode.engine.scheduler
    assert sched.num_remote_kv_failures == 3 and sched.num_remote_kv_loads == len(prompts) - 3
    _settle(prefill)
    assert _free_blocks(prefill) == free_p and _free_blocks(decode) == free_d


@pytest.mark.parametrize("connector", _backends())
def test_a_request_aborted_while_its_kv_arrives_frees_its_blocks(llama_dir, tmp_path, reference, connector):
    prompts, _ = reference
    prefill = _engine(llama_dir, connector, "kv_producer", tmp_path, abort_timeout_s=0.5)
    decode = _engine(llama_dir, connector, "kv_consumer", tmp_path)
    free_p, free_d = _free_blocks(prefill), _free_blocks(decode)
    params = _prefill(prefill, prompts[:2])
    for i, (prompt, p) in enumerate(zip(prompts[:2], params)):
        sp = GREEDY.clone_for_sample(0)
        sp.kv_transfer_params = p
        decode.engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, sp)
    decode.engine.step()  # admitted: blocks allocated, loads started
    assert decode.engine.scheduler.loading
    decode.engine.abort_request("r0")  # the client went away
    for _ in range(200):
        if not decode.engine.has_unfinished_requests() and not decode.engine.has_pending_transfers():
            break
        decode.engine.step()
    _settle(prefill)
    assert _free_blocks(prefill) == free_p and _free_blocks(decode) == free_d


def test_requests_for_a_role_the_instance_lacks_are_refused(llama_dir, tmp_path):
    plain = LLM(llama_dir, dtype="float32", num_gpu_blocks_override=96, max_model_len=512, show_progress=False)
    consumer = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path)
    with pytest.raises(ValueError, match="without --kv-transfer-config"):
        plain.generate({"prompt_token_ids": [5, 6]}, SamplingParams(kv_transfer_params={"do_remote_decode": True}),
                       use_tqdm=False)
    with pytest.raises(ValueError, match="kv_producer"):
        consumer.generate({"prompt_token_ids": [5, 6]}, SamplingParams(kv_transfer_params={"do_remote_decode": True}),
                          use_tqdm=False)
    with pytest.raises(ValueError, match="kv_role must be one of"):
        LLM(llama_dir, kv_transfer_config='{"kv_connector": "SharedMemoryConnector", "kv_role": "prefill"}')


def test_a_prompt_sampled_n_times_is_offered_once(llama_dir, tmp_path):
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path)
    out = prefill.generate({"prompt_token_ids": list(range(5, 60))},
                           SamplingParams(n=2, temperature=1.0, max_tokens=1,
                                          kv_transfer_params={"do_remote_decode": True}), use_tqdm=False)[0]
    _settle(prefill)
    assert out.kv_transfer_params["remote_num_tokens"] == 48
    assert len(prefill.engine.kv_transfer.staged) == 1
    assert [name for name in os.listdir(tmp_path / "sageinfer-kv") if name.endswith(".ready")] == [
        f"{out.kv_transfer_params['remote_engine_id']}-{out.kv_transfer_params['key']}.ready"]


def test_a_region_range_never_read_is_freed_after_its_ttl_and_a_late_consumer_fails_at_once(llama_dir, tmp_path):
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path, staged_ttl_s=0.3)
    prompts = _prompts(2)
    params = _prefill(prefill, prompts)
    producer = prefill.engine.kv_transfer
    assert len(producer.staged) == 2  # no decode instance came for them
    deadline = time.monotonic() + 5
    while producer.staged and time.monotonic() < deadline:
        producer.poll_sent()
        time.sleep(0.05)
    assert not producer.staged and producer.ranges.bytes_free == producer.ranges.size
    decode = _engine(llama_dir, "SharedMemoryConnector", "kv_consumer", tmp_path, load_timeout_s=30)
    free_d = _free_blocks(decode)
    start = time.monotonic()
    assert len(_decode(decode, prompts, params)[0]) == GREEDY.max_tokens  # computed the prompts itself
    assert time.monotonic() - start < 20  # no wait for the load timeout
    assert decode.engine.scheduler.num_remote_kv_failures == 2 and _free_blocks(decode) == free_d


def test_staged_kv_files_never_read_are_removed_after_their_ttl(llama_dir, tmp_path):
    prefill = _engine(llama_dir, "SharedMemoryConnector", "kv_producer", tmp_path, staged_ttl_s=0.3, staging_gb=0)
    _prefill(prefill, _prompts(2))
    assert len(os.listdir(tmp_path / "sageinfer-kv")) == 2  # no decode instance came for them
    deadline = time.monotonic() + 5
    while os.listdir(tmp_path / "sageinfer-kv") and time.monotonic() < deadline:
        prefill.engine.kv_transfer.poll_sent()
        time.sleep(0.05)
    assert not os.listdir(tmp_path / "sageinfer-kv")


def _ipc_dir(engine) -> str:
    connector = engine.engine.kv_transfer
    return os.path.join(connector.dir, connector.engine_id)


def test_ipc_kv_of_a_producer_process_that_is_gone_is_not_read(llama_dir, tmp_path, reference):
    """The handles name a process that has exited: its memory must not be read; the decode instance
    computes the prompt (the same outputs), and a live producer's sweep removes the dead one's files."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "DeviceIpcConnector", "kv_producer", tmp_path)
    decode = _engine(llama_dir, "DeviceIpcConnector", "kv_consumer", tmp_path)
    params = _prefill(prefill, prompts[:2])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with open(os.path.join(_ipc_dir(prefill), "handles.0"), "wb") as f:
        pickle.dump({"pid": gone.pid, "handles": []}, f)
    assert _decode(decode, prompts[:2], params) == expected[:2]
    assert decode.engine.scheduler.num_remote_kv_failures == 2
    other = _engine(llama_dir, "DeviceIpcConnector", "kv_producer", tmp_path)
    other.engine.kv_transfer.poll_sent()
    assert not os.path.exists(_ipc_dir(prefill)) and os.path.exists(_ipc_dir(other))


def test_ipc_blocks_being_read_are_not_freed_and_expired_ones_are_not_read(llama_dir, tmp_path, reference):
    """Claims decide between a consumer that reads and a producer that stops holding: a claimed offer
    stays held past abort_timeout_s (for load_timeout_s more), and an offer the producer gave up is
    never read (the decode instance computes the prompt)."""
    prompts, expected = reference
    prefill = _engine(llama_dir, "DeviceIpcConnector", "kv_producer", tmp_path, abort_timeout_s=0.3,
                      load_timeout_s=1.0)
    decode = _engine(llama_dir, "DeviceIpcConnector", "kv_consumer", tmp_path)
    free_p, free_d = _free_blocks(prefill), _free_blocks(decode)
    params = _prefill(prefill, prompts[:2])
    reading = os.path.join(_ipc_dir(prefill), params[0]["remote_key"])
    open(reading + ".claim", "w").close()  # a consumer in the middle of reading prompt 0's blocks
    time.sleep(0.5)
    _settle(prefill, 0.2)
    assert list(prefill.engine.scheduler.sending) == ["0-0"]  # prompt 1's freed at its timeout, 0's held
    assert os.path.exists(os.path.join(_ipc_dir(prefill), params[1]["remote_key"] + ".claim"))
    time.sleep(1.1)
    _settle(prefill, 0.5)  # the reader never finished: freed after load_timeout_s
    assert _free_blocks(prefill) == free_p
    assert _decode(decode, prompts[:2], params) == expected[:2]  # both given up: computed here
    assert decode.engine.scheduler.num_remote_kv_failures == 2 and _free_blocks(decode) == free_d


def test_only_the_ipc_connector_takes_tensor_parallel_instances_and_heads_must_cover(llama_dir, tmp_path, reference):
    """Only DeviceIpcConnector moves every rank's cache (tensor-parallel sizes may differ: heads are
    matched by their index in the model); an offer whose ranks do not hold every KV head this instance
    needs is refused per request (the prompt computed here)."""
    with pytest.raises(ValueError, match="use DeviceIpcConnector"):
        LLM(llama_dir, tensor_parallel_size=2,
            kv_transfer_config='{"kv_connector": "SharedMemoryConnector", "kv_role": "kv_producer"}')
    prompts, expected = reference
    prefill = _engine(llama_dir, "DeviceIpcConnector", "kv_producer", tmp_path)
    decode = _engine(llama_dir, "DeviceIpcConnector", "kv_consumer", tmp_path)
    params = _prefill(prefill, prompts[:2])
    heads = params[0]["remote_kv_heads"][0][1]
    params[0]["remote_kv_heads"] = [[0, heads - 1]]  # one head short
    params[1]["remote_kv_heads"] = [[0, heads // 2], [heads // 2, heads - heads // 2]]  # a rank 1 that is not there
    assert _decode(decode, prompts[:2], params) == expected[:2]
    assert decode.engine.scheduler.num_remote_kv_failures == 2


def test_ipc_head_plans_and_token_runs():
    """Which prefill rank fills which of a decode rank's KV heads, replicated heads included (fewer KV
    heads than ranks), and the runs of tokens a prompt's blocks hold."""
    from sageinfer.distributed.parallel_state import TensorParallelGroup, kv_head_range
    from sageinfer.transport.ipc_connector import _head_plan, _runs

    def ranks(heads, tp):
        return [kv_head_range(heads, TensorParallelGroup(r, tp)) for r in range(tp)]
    # 8 heads, prefill tp=2 (4 each), decode tp=4 (2 each): halves of the prefill ranks' heads
    assert [_head_plan(d, ranks(8, 2)) for d in ranks(8, 4)] == [
        [(0, 0, 0, 2)], [(0, 2, 0, 2)], [(1, 0, 0, 2)], [(1, 2, 0, 2)]]
    # decode tp=1 from prefill tp=4: four runs, one from each rank
    assert _head_plan(ranks(8, 1)[0], ranks(8, 4)) == [(q, 0, 2 * q, 2) for q in range(4)]
    # 2 heads replicated over 4 prefill ranks (0, 0, 1, 1): a decode rank holding both takes head 1 from
    # the first rank that holds it
    assert ranks(2, 4) == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert _head_plan((0, 2), ranks(2, 4)) == [(0, 0, 0, 1), (2, 0, 1, 1)]
    assert [_head_plan(d, ranks(2, 1)) for d in ranks(2, 4)] == [[(0, 0, 0, 1)], [(0, 0, 0, 1)],
                                                                 [(0, 1, 0, 1)], [(0, 1, 0, 1)]]
    assert _head_plan((0, 3), [(0, 2)]) is None  # a head no prefill rank holds
    # tokens [16, 48) of a prompt in blocks [7, 3, 9] of 16, in runs of 8: block 3's two, block 9's two
    assert _runs([7, 3, 9], 16, 16, 32, 8).tolist() == [6, 7, 18, 19]


def test_a_consumer_maps_a_region_once_and_lets_go_of_regions_whose_producer_closed(tmp_path):
    """Connectors over bare caches: two producers in turn (the first closes), one consumer; each
    prompt's KV arrives intact, the consumer keeps one mapping per live region."""
    import torch

    from sageinfer.attention.backend import LayerKVCache
    from sageinfer.platforms import get_platform
    from sageinfer.transport.kv_transfer_config import build_connector, parse_kv_transfer_config

    platform = get_platform("cpu")

    def connector(role, engine_id, fill):
        caches = [LayerKVCache(*(torch.randn(9, 4, 2, 8) if fill else torch.zeros(9, 4, 2, 8) for _ in "kv"))
                  for _ in range(2)]
        config = parse_kv_transfer_config({"kv_connector": "SharedMemoryConnector", "kv_role": role,
                                           "engine_id": engine_id, "kv_connector_extra_config": {
                                               "shm_dir": str(tmp_path), "staging_gb": 0.02}})
        return build_connector(config, caches, 4, platform), caches

    consumer, target = connector("kv_consumer", "decode", False)

    def transfer(producer, source, request_id):
        held, params = producer.send(request_id, [3, 5], 8)
        assert held and "region" in params
        consumer.start_load(request_id, params, [1, 2], 0)
        deadline = time.monotonic() + 10
        while not (done := consumer.poll_loaded()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done == [(request_id, None)]
        for s, t in zip(source, target):
            assert torch.equal(t.k[1:3], s.k[[3, 5]]) and torch.equal(t.v[1:3], s.v[[3, 5]])

    def look_for_regions():  # as the consumer's engine loop does, at most once a second
        consumer._next_region_scan = 0.0
        consumer.poll_loaded()
        consumer.workers.submit(lambda: None).result()  # (a pool thread has taken the mapping by then)
        with consumer._map_lock:
            return list(consumer.mapped)

    first, source = connector("kv_producer", "prefill-a", True)
    deadline = time.monotonic() + 10
    while look_for_regions() != [first.region_path] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(consumer.mapped) == [first.region_path]  # mapped before its first load
    transfer(first, source, "r1")
    transfer(first, source, "r2")
    assert list(consumer.mapped) == [first.region_path]  # mapped once
    first.close()
    assert look_for_regions() == []  # let go without waiting for a load
    second, source = connector("kv_producer", "prefill-b", True)
    transfer(second, source, "r3")
    assert list(consumer.mapped) == [second.region_path]  # the closed producer's mapping let go
    second.close()
    consumer.close()
    assert not consumer.mapped and not os.listdir(tmp_path / "sageinfer-kv")
