"""Random request bodies, valid and not, against a live server: every one gets an answer that is not a server
failure (no 5xx but 503), nothing is left open, and the server still serves. Seeded, so a failure repeats.

Fields take values that fit (so the requests reach the engine with odd combinations: grammars with allowed
tokens, n with streams, echo with logprobs) or values of the wrong type, range or text (lone surrogates)."""
import json
import random
import time

import httpx
import pytest

from server_util import ServerProcess

WRONG = [None, True, 0, -1, 2**63, 1e308, 0.5, "", "x", "\ud800", "a\udfffb", [], [[]], [-1], [2**40], {}, {"a": 1},
         [None], "😀" * 20, list(range(300))]
FITTING = {
    "prompt": ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3, 4]], "你好"], "max_tokens": [1, 4, 40],
    "temperature": [0, 1.0], "top_p": [0.1, 1.0], "top_k": [-1, 1, 5], "n": [1, 2, 3],
    "stop": ["a", ["a", "b"], "你"],
    "stream": [True, False], "logprobs": [0, 2, True], "echo": [True], "seed": [0, 7], "presence_penalty": [0.5],
    "repetition_penalty": [1.2], "logit_bias": [{"5": 100}, {"0": -100}], "min_tokens": [0, 3, 10],
    "ignore_eos": [True, False], "stream_options": [{"include_usage": True}], "prompt_logprobs": [0, 2],
    "min_p": [0.1], "stop_token_ids": [[1, 2]], "guided_choice": [["yes", "no"], ["a"]], "guided_regex": ["[a-z]+"],
    "guided_json": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                    {"type": "string", "pattern": "\ud800"}],
    "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}],
    "truncate_prompt_tokens": [1, 300], "allowed_token_ids": [[1, 2, 3]], "bad_words": [["a"]],
    "include_stop_str_in_output": [True], "top_logprobs": [0, 3],
    "tools": [[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]],
    "tool_choice": ["none", "auto", "required", {"type": "function", "function": {"name": "f"}}],
    "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                 [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 [{"role": "tool", "content": "x"}], [{"role": "user", "content": None}]],
    "continue_final_message": [True], "add_generation_prompt": [False], "tokens": [[1, 2, 3], []],
}
ROUTES = {
    "/v1/completions": ({"model": "tiny", "prompt": "hello", "max_tokens": 4},
                        ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "stream", "logprobs",
                         "echo", "seed", "presence_penalty", "repetition_penalty", "logit_bias", "min_tokens",
                         "ignore_eos", "stream_options", "prompt_logprobs", "min_p", "stop_token_ids", "guided_choice",
                         "guided_regex", "guided_json", "response_format", "truncate_prompt_tokens",
                         "allowed_token_ids", "bad_words", "include_stop_str_in_output"]),
    "/v1/chat/completions": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                             ["messages", "max_tokens", "temperature", "n", "stop", "stream", "logprobs",
                              "top_logprobs", "tools", "tool_choice", "response_format", "seed", "stream_options",
                              "min_tokens", "continue_final_message", "add_generation_prompt", "guided_json",
                              "allowed_token_ids"]),
    "/tokenize": ({"model": "tiny", "prompt": "hi"}, ["prompt", "messages", "add_generation_prompt"]),
    "/detokenize": ({"model": "tiny", "tokens": [1, 2]}, ["tokens"]),
}


@pytest.fixture(scope="module")
def server(llama_dir):
    srv = ServerProcess(llama_dir, "--max-num-seqs", "4", "--max-waiting-requests", "8", "--max-model-len", "256")
    yield srv
    assert srv.stop() == 0


def _bodies(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        route = rng.choice(sorted(ROUTES))
        base, fields = ROUTES[route]
        body = dict(base)
        for _ in range(rng.randint(1, 4)):
            name = rng.choice(fields)
            body[name] = rng.choice(FITTING[name]) if name in FITTING and rng.random() < 0.8 else rng.choice(WRONG)
        yield route, json.dumps(body).encode()


def test_random_bodies_get_answers_and_leave_nothing_open(server):
    failures = []
    with httpx.Client(timeout=60, headers={**server.headers, "Content-Type": "application/json"}) as http:
        for route, body in _bodies(seed=7, count=300):
            with http.stream("POST", server.base_url + route, content=body) as resp:
                text = "".join(resp.iter_text())
            if resp.status_code >= 500 or '"code": 500' in text or '"code":500' in text:
                failures.append((route, body[:300], resp.status_code, text[:300]))
    assert not failures, failures[:5]
    deadline = time.monotonic() + 10
    while (m := server.metrics())["sageinfer:num_requests_running"] + m["sageinfer:num_requests_waiting"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["sageinfer:num_requests_running"] == m["sageinfer:num_requests_waiting"] == 0
    assert m["sageinfer:kv_cache_free_blocks"] == m["sageinfer:kv_cache_total_blocks"]
    # twelve requests left open would hold every place (max_num_seqs 4 + 8 waiting): then this is a 503
    ok = httpx.post(server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                    headers=server.headers, timeout=60)
    assert ok.status_code == 200, ok.text
