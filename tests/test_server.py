"""The OpenAI-compatible server against the official client, under load, and with bad input."""
import asyncio
import json

import httpx
import numpy as np
import openai
import pytest

from sageinfer import LLM, SamplingParams
from server_util import ServerProcess


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = ServerProcess(llama_dir, "--max-num-seqs", "32", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                        "--enable-prompt-tokens-details")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir, dtype="float32", num_gpu_blocks_override=400, show_progress=False)


def test_a_streamed_event_whose_text_holds_unicode_line_breaks_stays_one_line():
    """Token text may hold U+0085, U+2028 or U+2029, which JSON leaves raw but line readers (httpx's
    aiter_lines, Python's splitlines) split on: the event escapes them and decodes back to its text."""
    from httpx._decoders import LineDecoder

    from sageinfer.gateway.api_server import _sse
    payload = {"choices": [{"index": 0, "text": "a\x85b\u2028c\u2029d\x1c\u00e9\u4e2d"}]}
    lines = [line for line in LineDecoder().decode(_sse(payload)) if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: "):]) == payload
    assert "\u00e9\u4e2d" in lines[0]  # other characters stay as UTF-8


def test_completion_equals_offline_generate(client, offline):
    out = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=12, temperature=0)
    ref = offline.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert out.choices[0].text == ref.outputs[0].text
    assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_streamed_completion_concatenates_to_the_full_text_and_reports_usage(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_continuous_usage_stats_count_the_tokens_so_far_in_every_chunk(client):
    for create, body in ((client.completions.create, {"prompt": "Once upon a time", "n": 2}),
                         (client.chat.completions.create, {"messages": [{"role": "user", "content": "Hi"}]})):
        chunks = list(create(model="tiny", max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True},
                             stream_options={"include_usage": True, "continuous_usage_stats": True}, **body))
        per_choice = [c for c in chunks if c.choices and c.usage is not None]
        assert per_choice and all(c.usage is not None for c in chunks)
        counts = [c.usage.completion_tokens for c in per_choice]
        assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens
        assert chunks[-1].usage.completion_tokens == 12 * body.get("n", 1)
        assert {c.usage.prompt_tokens for c in per_choice} == {chunks[-1].usage.prompt_tokens}
    plain = list(client.completions.create(model="tiny", prompt="x", max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_prompt_tokens_served_from_the_cache_are_reported(client):
    """--enable-prompt-tokens-details: a repeated prompt's whole blocks come from the prefix cache, and the usage
    says how many tokens, streamed and not."""
    prompt = "The capital of France is Paris. " * 12
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_completion_streamed_and_not(client, offline):
    messages = [{"role": "user", "content": "你好，世界"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == full.choices[0].message.content and full.choices[0].message.role == "assistant"
    tok = offline.get_tokenizer()
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    ref = offline.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert full.choices[0].message.content == ref[0].outputs[0].text


def test_n_stop_and_logprobs(client):
    out = client.completions.create(model="tiny", prompt="The capital of", max_tokens=16, temperature=1.0, n=2,
                                    seed=3, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    for c in out.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) > 0
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    full = client.completions.create(model="tiny", prompt="The capital of", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[3:5]
    stopped = client.completions.create(model="tiny", prompt="The capital of", max_tokens=16, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[:full.find(stop)]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)


def test_64_concurrent_streams_complete_with_correct_outputs(server, offline):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(1, 200, size=64)]
    max_tokens = [int(m) for m in rng.integers(1, 24, size=64)]
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)

    async def one(prompt, n):
        stream = await aclient.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all():
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_tokens)))

    texts = asyncio.run(run_all())
    refs = offline.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens],
                            use_tqdm=False)
    assert texts == [r.outputs[0].text for r in refs]


def test_clients_disconnecting_mid_stream_leak_no_blocks(server):
    async def disconnect_after_two_chunks(i):
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": "tiny", "prompt": [5 + i] * 50, "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with http.stream("POST", server.base_url + "/v1/completions", json=body,
                                   headers=server.headers) as resp:
                assert resp.status_code == 200
                seen = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen == 2:
                            return  # leaves the stream: the connection closes

    async def run_all():
        await asyncio.gather(*(disconnect_after_two_chunks(i) for i in range(12)))

    asyncio.run(run_all())
    for _ in range(100):
        m = server.metrics()
        if m["sageinfer:num_requests_running"] == 0 and m["sageinfer:num_requests_waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert m["sageinfer:num_requests_running"] == 0 and m["sageinfer:num_requests_waiting"] == 0
    assert m["sageinfer:kv_cache_free_blocks"] == m["sageinfer:kv_cache_total_blocks"]
    assert m["sageinfer:generation_tokens_total"] < 12 * 200  # they were aborted, not run to the end


BAD_REQUESTS = [
    ("wrong type", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("negative max_tokens", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("top_p out of range", "/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 2}, 400, "top_p"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("oversized prompt", "/v1/completions", {"model": "tiny", "prompt": [5] * 5000}, 400, "prompt"),
    ("missing prompt", "/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"model": "tiny", "prompt": [10 ** 7]}, 400, "prompt"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages"),
    ("priority under fcfs", "/v1/completions", {"model": "tiny", "prompt": "x", "priority": 1}, 400, "priority"),
    ("chat priority under fcfs", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "priority": -2}, 400, "priority"),
    ("priority not an integer", "/v1/completions", {"model": "tiny", "prompt": "x", "priority": "high"}, 400,
     "priority"),
]


@pytest.mark.parametrize("name, path, body, status, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, name, path, body, status, param):
    resp = httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and param in (error.get("param") or "") + error["message"]
    ok = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    headers=server.headers, timeout=30)
    assert ok.status_code == 200


LONE_SURROGATES = [  # JSON's "\ud800" escapes decode to strings that are no Unicode text; tokenizers refuse them
    ("/v1/completions", {"model": "tiny", "prompt": "\ud800", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok", "a\udfffb"], "max_tokens": 2, "stream": True}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "ok", "bad_words": ["\udc00"]}, "bad_words"),
    ("/v1/completions", {"model": "tiny", "prompt": "ok", "max_tokens": 2, "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "x\udbff"},
     "stop"),
    ("/tokenize", {"model": "tiny", "prompt": "x\ud800"}, "prompt"),
]


@pytest.mark.parametrize("path, body, param", LONE_SURROGATES, ids=[f"{p[0]}-{p[2]}" for p in LONE_SURROGATES])
def test_text_with_a_lone_surrogate_gets_400_naming_the_field(server, path, body, param):
    resp = httpx.post(server.base_url + path, content=json.dumps(body).encode(), timeout=30,
                      headers={**server.headers, "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    ok = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    headers=server.headers, timeout=30)
    assert ok.status_code == 200


def test_invalid_json_and_wrong_key(server):
    resp = httpx.post(server.base_url + "/v1/completions", content=b"{not json", timeout=30,
                      headers={**server.headers, "Content-Type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30,
                      headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200


def test_ping_and_version_answer_without_the_key(server):
    import sageinfer
    for method in ("GET", "POST"):
        assert httpx.request(method, server.base_url + "/ping", timeout=30).status_code == 200
    assert httpx.get(server.base_url + "/version", timeout=30).json() == {"version": sageinfer.__version__}


def test_models_tokenize_detokenize(server, offline):
    models = httpx.get(server.base_url + "/v1/models", headers=server.headers, timeout=30).json()
    assert models["data"][0]["id"] == "tiny"
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "你好，世界"}, headers=server.headers,
                     timeout=30).json()["tokens"]
    assert ids == offline.get_tokenizer().encode("你好，世界")
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": ids}, headers=server.headers,
                      timeout=30).json()["prompt"]
    assert text == "你好，世界"


def test_metrics_parse_as_prometheus_with_vllm_names_and_the_model_label(server):
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(server.base_url + "/metrics", headers=server.headers, timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens", "generation_tokens", "num_preemptions", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_success", "cache_config_info", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "tokens_per_second_per_device"):
        family = families[f"sageinfer:{name}"]
        assert family.documentation, name
        assert all(s.labels.get("model_name") == "tiny" for s in family.samples), name
    assert families["sageinfer:generation_tokens"].samples[0].value > 0
    info = families["sageinfer:cache_config_info"].samples[0].labels
    assert info["block_size"] and info["num_gpu_blocks"] == "399"
    assert "process_cpu_seconds" in families
    # The CPU has no datasheet peak: no utilisation share is made up; a GPU's are shares of its peak.
    assert ("sageinfer:mfu" in families) == ("sageinfer:mbu" in families)
    for name in ("sageinfer:mfu", "sageinfer:mbu"):
        if name in families:
            assert 0 <= families[name].samples[0].value < 1


def test_sigterm_finishes_in_flight_requests_and_exits_zero(llama_dir):
    srv = ServerProcess(llama_dir, api_key=None)
    try:
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 30, "stream": True, "ignore_eos": True,
                                "stream_options": {"include_usage": True}}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.proc.terminate()  # SIGTERM while the stream is open
            # On a GPU the engine may outrun the stream, so one chunk can carry many tokens: the whole
            # stream, the first chunk included, must add up to every token asked for.
            events = [first] + [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in events[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 30
    finally:
        assert srv.stop() == 0


def test_bench_serve_writes_a_complete_result_file(server, tmp_path):
    import subprocess
    import sys
    result_file = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "sageinfer.gateway.cli", "bench", "serve", "--base-url",
                           server.base_url, "--model", "tiny", "--api-key", server.api_key, "--input-len", "32",
                           "--output-len", "8", "--num-prompts", "16", "--request-rate", "20", "--vocab-size", "512",
                           "--goodput", "ttft:60000", "e2el:60000", "--result-file", str(result_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(result_file.read_text())
    assert r["completed"] == 16 and r["failed"] == 0 and r["total_output_tokens"] == 16 * 8
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(r[metric]) == {"mean", "median", "p90", "p99"} and r[metric]["p99"] >= r[metric]["median"] > 0
    assert r["goodput_req_s"] == pytest.approx(r["request_throughput"])
    assert list(r["ttft_ms_by_prompt_len"]) == ["<=1024"] and r["ttft_ms_by_prompt_len"]["<=1024"]["count"] == 16
    # a mixed-length workload: each request its own lengths, cut to the model's length
    from sageinfer.bench.mixed import mixed_lengths
    proc = subprocess.run([sys.executable, "-m", "sageinfer.gateway.cli", "bench", "serve", "--base-url",
                           server.base_url, "--model", "tiny", "--api-key", server.api_key, "--dataset", "chat-mix",
                           "--max-model-len", "256", "--num-prompts", "10", "--vocab-size", "512",
                           "--result-file", str(result_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(result_file.read_text())
    prompts, outputs = mixed_lengths("chat-mix", 10, seed=0, max_model_len=256)
    assert r["dataset"] == "chat-mix" and r["completed"] == 10
    assert r["total_output_tokens"] == sum(outputs) and r["total_input_tokens"] == sum(prompts)
    # conversations: each turn resends the conversation so far, which the prefix cache then holds.
    # KV blocks are 16 tokens on the CPU and 64 on a GPU: 128-token openings are whole blocks for both.
    hits_before = server.metrics()["sageinfer:prefix_cache_hits_total"]
    proc = subprocess.run([sys.executable, "-m", "sageinfer.gateway.cli", "bench", "serve", "--base-url",
                           server.base_url, "--model", "tiny", "--api-key", server.api_key, "--dataset", "multi-turn",
                           "--num-prompts", "3", "--turns", "3", "--input-len", "120", "--user-len", "8",
                           "--output-len", "4", "--vocab-size", "512", "--result-file", str(result_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(result_file.read_text())
    assert r["dataset"] == "multi-turn" and r["completed"] == 9 and r["total_output_tokens"] == 9 * 4
    assert r["total_input_tokens"] == 3 * ((120 + 8) + (120 + 8 + 12) + (120 + 8 + 24))
    assert r["later_turn_ttft_ms"]["median"] > 0 and r["first_turn_ttft_ms"]["median"] > 0
    # turns 2 and 3 of each conversation find the first turn's 128 tokens cached (the model's own
    # answers differ from the answers the benchmark sends back, so later blocks do not match)
    assert server.metrics()["sageinfer:prefix_cache_hits_total"] - hits_before >= 3 * (128 + 128)


def test_requests_over_the_queue_limit_get_503_and_the_rest_complete(llama_dir):
    srv = ServerProcess(llama_dir, "--max-num-seqs", "1", "--max-waiting-requests", "1", api_key=None)
    try:
        async def one(http, i):
            return await http.post(srv.base_url + "/v1/completions", timeout=120,
                                   json={"prompt": [5 + i] * 20, "max_tokens": 40, "ignore_eos": True})

        async def run_all():
            async with httpx.AsyncClient() as http:
                return await asyncio.gather(*(one(http, i) for i in range(8)))

        codes = sorted(r.status_code for r in asyncio.run(run_all()))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        assert httpx.get(srv.base_url + "/health", timeout=30).status_code == 200
    finally:
        assert srv.stop() == 0


def test_completion_logprobs_give_each_tokens_text_offset(client):
    for echo in (False, True):
        out = client.completions.create(model="tiny", prompt="The capital of", max_tokens=12, temperature=0,
                                        logprobs=1, echo=echo, extra_body={"ignore_eos": True}).choices[0]
        lp = out.logprobs
        # with echo the prompt's tokens come first (vLLM's and OpenAI's legacy shape)
        assert lp.text_offset[0] == 0 and len(lp.text_offset) == len(lp.tokens)
        assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
        assert "".join(lp.tokens) == out.text
        streamed = [o for c in client.completions.create(model="tiny", prompt="The capital of", max_tokens=12,
                                                         temperature=0, logprobs=1, echo=echo, stream=True,
                                                         extra_body={"ignore_eos": True})
                    if c.choices for o in c.choices[0].logprobs.text_offset]
        assert streamed == lp.text_offset


def test_logit_bias_and_allowed_token_ids_as_offline(client, offline):
    def offline_tokens(**extra):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **extra)
        return offline.generate("The capital of", params, use_tqdm=False)[0].outputs[0]

    banned = offline_tokens().token_ids[0]
    cases = [({"logit_bias": {str(banned): -100}}, {"logit_bias": {banned: -100}}),
             ({"logit_bias": {"7": 100}}, {"logit_bias": {7: 100}}),
             ({"allowed_token_ids": [7, 8, 9]}, {"allowed_token_ids": [7, 8, 9]})]
    refs = []
    for body_extra, params_extra in cases:
        ref = offline_tokens(**params_extra)
        out = client.completions.create(model="tiny", prompt="The capital of", max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True, **body_extra})
        assert out.choices[0].text == ref.text
        refs.append(ref.token_ids)
    assert banned not in refs[0] and refs[1] == [7] * 8 and set(refs[2]) <= {7, 8, 9}


def test_bad_words_through_the_server_as_offline(client, offline):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, bad_words=["the", "capital"])
    ref = offline.generate("The capital of", params, use_tqdm=False)[0].outputs[0]
    out = client.completions.create(model="tiny", prompt="The capital of", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True, "bad_words": ["the", "capital"]})
    assert out.choices[0].text == ref.text


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, offline):
    prompt = list(range(10, 60))
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "truncate_prompt_tokens": 20})
    ref = offline.generate({"prompt_token_ids": prompt[-20:]}, SamplingParams(temperature=0, max_tokens=6,
                                                                              ignore_eos=True), use_tqdm=False)[0]
    assert out.usage.prompt_tokens == 20 and out.choices[0].text == ref.outputs[0].text
    long_text = "lorem ipsum " * 2000  # more tokens than max_model_len, kept to its last 100
    kept = client.completions.create(model="tiny", prompt=long_text, max_tokens=2,
                                     extra_body={"truncate_prompt_tokens": 100})
    assert kept.usage.prompt_tokens == 100


def test_structured_output_through_the_openai_client(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "sunny"],
              "properties": {"city": {"enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Weather?"}]
    for seed in range(3):
        chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=1.0,
                                              seed=seed, response_format=fmt)
        obj = json.loads(chat.choices[0].message.content)
        assert obj["city"] in ("Paris", "Rome") and isinstance(obj["sunny"], bool) and set(obj) == {"city", "sunny"}
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=1.0,
                                            seed=9, response_format=fmt, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert set(json.loads(streamed)) == {"city", "sunny"}
    choice = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=10, temperature=1.0, seed=1,
                                       extra_body={"guided_choice": ["alpha", "beta"]})
    assert choice.choices[0].text in ("alpha", "beta")
    regex = client.completions.create(model="tiny", prompt="Code:", max_tokens=10, temperature=1.0, seed=2,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{2}"}})
    assert len(regex.choices[0].text) == 4 and regex.choices[0].text[:2].isupper()
    obj = client.chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0.5, seed=3,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "The weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                            "additionalProperties": False}}},
         {"type": "function", "function": {
             "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                "required": ["zone"], "additionalProperties": False}}}]
# The tiny random model would never write a call by itself: a regex makes it write one, which the
# server must then parse as it parses a real model's (tool_choice "auto", Hermes format).
CALL_REGEX = r'Checking\.<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'


def test_tool_calls_auto_parsed_from_the_text_streamed_and_not(client):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=200, seed=1,
                                         extra_body={"guided_regex": CALL_REGEX})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    stream = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=200, seed=1,
                                            stream=True, extra_body={"guided_regex": CALL_REGEX})
    content, calls, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "Checking." and reasons[-1] == "tool_calls"
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == \
        [(0, "get_weather", call.function.arguments)]
    # The conversation goes on with the call and its result in the history.
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": '{"sunny": true}'}]
    follow = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5)
    assert follow.choices[0].message.tool_calls is None


def test_parallel_tool_calls_false_keeps_one_call(client):
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    two = CALL_REGEX.replace("(Paris|Rome)", "Paris") + CALL_REGEX.replace("(Paris|Rome)", "Rome")[len("Checking\\."):]
    for parallel, cities in ((True, ["Paris", "Rome"]), (False, ["Paris"])):
        body = {"guided_regex": two, "parallel_tool_calls": parallel}
        out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=300, seed=1,
                                             extra_body=body)
        assert [json.loads(c.function.arguments)["city"] for c in out.choices[0].message.tool_calls] == cities
        stream = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=300,
                                                seed=1, stream=True, extra_body=body)
        calls = [c for chunk in stream for c in (chunk.choices[0].delta.tool_calls or [])]
        assert [(c.index, json.loads(c.function.arguments)["city"]) for c in calls] == list(enumerate(cities))
    for seed in range(3):  # "required": the grammar's list holds one call
        out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                             max_tokens=400, temperature=1.0, seed=seed,
                                             extra_body={"parallel_tool_calls": False})
        assert len(out.choices[0].message.tool_calls) == 1


def test_tool_choice_required_and_named_follow_the_schemas(client):
    messages = [{"role": "user", "content": "Anything"}]
    for seed in range(3):  # a call is about 50 tokens, and the random model may write several
        out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                             max_tokens=400, temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        for call in out.choices[0].message.tool_calls:
            args = json.loads(call.function.arguments)
            assert (call.function.name, list(args)) in (("get_weather", ["city"]), ("get_time", ["zone"]))
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice=named,
                                             max_tokens=40, temperature=1.0, seed=4, stream=stream)
        if stream:
            calls = [c for chunk in out for c in (chunk.choices[0].delta.tool_calls or [])]
        else:
            calls = out.choices[0].message.tool_calls
        (call,) = calls
        assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_echo_with_logprobs_scores_the_prompt_and_prompt_logprobs_as_vllm(client, offline):
    """What evaluation harnesses send (echo, logprobs=1, max_tokens=1) to score a text."""
    prompt = "The capital of France is Paris"
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                           use_tqdm=False)[0]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    lp = out.choices[0].logprobs
    n = len(ref.prompt_token_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == n + 1
    assert "".join(lp.tokens[:n]) == prompt  # the echoed prompt, token by token
    expected = [ref.prompt_logprobs[i][t].logprob for i, t in enumerate(ref.prompt_token_ids) if i]
    np.testing.assert_allclose(lp.token_logprobs[1:n], expected, atol=1e-4)
    assert lp.text_offset[:n] == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.text_offset[n] == len(prompt)  # the completion's token starts after the echoed prompt
    raw = httpx.post(client.base_url.join("completions").__str__(), headers={"Authorization": f"Bearer {client.api_key}"},
                     json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}).json()
    entries = raw["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == n
    first = ref.prompt_token_ids[1]
    assert entries[1][str(first)]["logprob"] == pytest.approx(ref.prompt_logprobs[1][first].logprob, abs=1e-4)
    chat = httpx.post(client.base_url.join("chat/completions").__str__(),
                      headers={"Authorization": f"Bearer {client.api_key}"},
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                            "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) > 3
