"""The prefill/decode proxy: an OpenAI-compatible front door over prefill instances (kv_producer)
and decode instances (kv_consumer). Each completion or chat request is first sent to the least
loaded prefill instance with one token to generate and {"do_remote_decode": true}; the
kv_transfer_params it answers with go, with the original request, to the least loaded decode
instance, whose answer (streamed or not) is the client's.

With max_local_prefill_tokens, prompts of at most that many tokens skip the prefill instances: the
decode instance computes them itself (a short prefill costs a decode batch little, while the trip
through a prefill instance costs it a round trip and the transfer), so only long prompts, the ones
that would stall a decode batch, are separated. The count comes from a decode instance's /tokenize
(token-id prompts are counted here); a prompt that cannot be counted takes the prefill instances.

Pairing: an instance comes into rotation once its /kv_transfer shows a connector of its side's role
whose KV pairs with the other side's instances (the same connector, cache layout and, for NIXL, block
size); one that does not stays out, with the reason in the log and in /pd/instances.

Faults: a prefill instance that cannot be reached or fails is marked down and the request goes to
another; with none left, the decode instance computes the prompt itself (slower, same answer). A
decode instance that cannot be reached is marked down and another one is tried. A client that goes
away closes the decode stream, which aborts the request there; the prefill instance's KV is dropped
by its connector (read, expired, or freed at once for shared memory).
"""
from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from sageinfer.router.app import _PASSED_HEADERS
from sageinfer.router.backends import Backend, BackendPool
from sageinfer.router.forwarding import CONNECT_ERRORS, add_openai_routes, forward_to_pool, json_body
from sageinfer.router.forwarding import error as _error
from sageinfer.router.policies import Policy
from sageinfer.transport.kv_pairing import CONSUMER_ROLES, PRODUCER_ROLES, pairing_mismatch

logger = logging.getLogger(__name__)


def _prefill_body(body: dict) -> dict:
    """The request as the prefill instance sees it: one token, no stream, and the KV kept for decode."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["min_tokens"] = 0
    out["n"] = 1
    out["kv_transfer_params"] = {"do_remote_decode": True}
    return out


async def _post_json(client: httpx.AsyncClient, url: str, obj: dict, headers: dict) -> httpx.Response:
    """POST obj as the client sent it: JSON's own escapes (httpx's encoder writes UTF-8 and refuses NaN, so a
    lone surrogate or a NaN in the client's body raised here, a 500, instead of the instance's 400)."""
    return await client.post(url, content=json.dumps(obj).encode(), headers={**headers, "content-type":
                                                                              "application/json"})


def _json_field(resp: httpx.Response, name: str):
    """A field of an instance's JSON answer; None where the answer is no JSON object."""
    try:
        answer = resp.json()
    except ValueError:
        return None
    return answer.get(name) if isinstance(answer, dict) else None


def _admission(side: str, roles: tuple[str, ...], others: BackendPool):
    """A pool's admission of an instance (BackendPool.admit): a connector of the side's role, whose KV
    pairs with that of every instance already admitted on the other side. Instances that say nothing
    of their KV transfer (not sageInfer's) are taken unchecked: each request's transfer is checked
    where its KV is loaded."""
    warned: set[str] = set()

    def admit(backend: Backend, info: dict | None, known: bool) -> str | None:
        if not known:
            if backend.url not in warned:
                warned.add(backend.url)
                logger.warning("%s instance %s has no /kv_transfer: its KV transfer is not checked before "
                               "requests go to it", side, backend.url)
            return None
        if info is None:
            return f"it has no --kv-transfer-config: a {side} instance needs a connector"
        if info["kv_role"] not in roles:
            return f"its kv_role is {info['kv_role']}: a {side} instance needs one of {', '.join(roles)}"
        for other in others.healthy():
            if other.kv_transfer is None:
                continue
            pair = (info, other.kv_transfer) if side == "prefill" else (other.kv_transfer, info)
            reason = pairing_mismatch(*pair)
            if reason is not None:
                return f"its KV cannot go to or come from {other.url}: {reason}"
        return None
    return admit


def _count(backend: Backend) -> None:
    backend.served += 1


class _Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sageinfer_pd_proxy:requests", "Requests, by the path they took.", ["path"],
                                registry=self.registry)


def build_pd_proxy_app(prefill: BackendPool, decode: BackendPool, max_attempts: int = 3,
                       max_local_prefill_tokens: int = 0) -> FastAPI:
    if max_local_prefill_tokens < 0:
        raise ValueError(f"max_local_prefill_tokens must be >= 0, got {max_local_prefill_tokens}")
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
    prefill.admit = _admission("prefill", PRODUCER_ROLES, decode)
    decode.admit = _admission("decode", CONSUMER_ROLES, prefill)
    policy = Policy("least_load")
    metrics = _Metrics()

    @asynccontextmanager
    async def lifespan(_):
        prefill.start()
        decode.start()
        yield
        await prefill.stop()
        await decode.stop()
        await client.aclose()

    app = FastAPI(title="sageInfer PD proxy", lifespan=lifespan)

    def pick(pool: BackendPool, tried: set[str]) -> Backend | None:
        candidates = [b for b in pool.healthy() if b.url not in tried]
        return policy.pick(candidates, None) if candidates else None

    async def run_prefill(path: str, body: dict, headers: dict):
        """The prefill instance's kv_transfer_params; None if none could serve; a Response if the
        request itself was refused (the client's fault: said as the instance said it)."""
        tried: set[str] = set()
        for _ in range(max_attempts):
            backend = pick(prefill, tried)
            if backend is None:
                return None
            tried.add(backend.url)
            backend.in_flight += 1
            try:
                resp = await _post_json(client, backend.url + path, _prefill_body(body), headers)
            except CONNECT_ERRORS as exc:
                prefill.mark_down(backend, f"{type(exc).__name__}: {exc}")
                continue
            finally:
                backend.in_flight -= 1
            if 400 <= resp.status_code < 500:
                return Response(resp.content, status_code=resp.status_code, media_type="application/json")
            if resp.status_code != 200:
                logger.warning("prefill instance %s answered %d; trying another", backend.url, resp.status_code)
                continue
            backend.served += 1
            params = _json_field(resp, "kv_transfer_params")
            if not isinstance(params, dict):
                logger.warning("prefill instance %s returned no kv_transfer_params (is it a kv_producer?)",
                               backend.url)
                return None
            return params
        return None

    async def prompt_tokens(path: str, body: dict, headers: dict) -> int | None:
        """How many tokens the request's prompt has (None: not known)."""
        prompt = body.get("prompt")
        if path.endswith("/completions") and "chat" not in path:
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return len(prompt)
            if not isinstance(prompt, str):
                return None  # a batch of prompts: each goes as it would without the threshold
            query = {"model": body.get("model"), "prompt": prompt}
        elif isinstance(body.get("messages"), list):
            query = {"model": body.get("model"), "messages": body["messages"]}
        else:
            return None
        backend = pick(decode, set())
        if backend is None:
            return None
        try:
            resp = await _post_json(client, backend.url + "/tokenize", query, headers)
        except CONNECT_ERRORS:
            return None
        count = _json_field(resp, "count") if resp.status_code == 200 else None
        return count if isinstance(count, int) else None

    async def forward(path: str, raw: Request):
        got = await json_body(raw)
        if isinstance(got, JSONResponse):
            return got
        _, body = got
        headers = {k: v for k, v in raw.headers.items() if k.lower() in _PASSED_HEADERS}
        tokens = await prompt_tokens(path, body, headers) if max_local_prefill_tokens > 0 else None
        if tokens is not None and tokens <= max_local_prefill_tokens:
            params, label = None, "local_prefill"
        else:
            params = await run_prefill(path, body, headers)
            if isinstance(params, Response):
                return params
            label = "pd" if params is not None else "decode_only"
            if params is None:
                logger.warning("no prefill instance served the request: the decode instance computes the prompt")
        metrics.requests.labels(label).inc()
        decode_body = dict(body)
        if params is not None:
            decode_body["kv_transfer_params"] = params
        else:
            decode_body.pop("kv_transfer_params", None)
        headers["content-type"] = "application/json"
        answer = await forward_to_pool(client, decode, lambda tried: pick(decode, tried), path,
                                       json.dumps(decode_body).encode(), headers, bool(body.get("stream")),
                                       max_attempts, on_sent=_count)
        return answer or _error(503, "no decode instance is available to serve the request", "ServiceUnavailableError")

    add_openai_routes(app, forward, client, decode)

    @app.get("/health")
    async def health():
        up_p, up_d = len(prefill.healthy()), len(decode.healthy())
        return JSONResponse({"healthy_prefill": up_p, "healthy_decode": up_d}, status_code=200 if up_d else 503)

    @app.get("/pd/instances")
    async def instances():
        return {role: [{"url": b.url, "healthy": b.healthy, "load": b.load, "served": b.served, "refused": b.refused}
                       for b in pool.backends] for role, pool in (("prefill", prefill), ("decode", decode))}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
