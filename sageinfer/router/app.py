"""The router's OpenAI-compatible front door: completions and chat (streaming or not) go to the
instance the policy picks; /v1/models, /health and /metrics answer for the pool.

An instance that cannot be reached is marked down and the request goes to another, as long as
nothing has been sent to the client yet; a stream cut off mid-way ends with an OpenAI error event.
Headers such as the API key pass through to the instances.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from sageinfer.router.backends import Backend, BackendPool, instance_url_error
from sageinfer.router.forwarding import error as _error
from sageinfer.router.forwarding import add_openai_routes, forward_to_pool, json_body
from sageinfer.router.policies import Policy

logger = logging.getLogger(__name__)
_PASSED_HEADERS = ("authorization", "content-type", "x-request-id")
_SESSION_HEADER = "x-session-id"


class _Metrics:
    def __init__(self, pool: BackendPool):
        self.registry = CollectorRegistry()
        self.requests = Counter("sageinfer_router:requests", "Requests sent, by instance.", ["backend"],
                                registry=self.registry)
        self.retries = Counter("sageinfer_router:retries", "Requests moved to another instance after one "
                               "could not be reached.", registry=self.registry)
        self.healthy = Gauge("sageinfer_router:backend_healthy", "1 while an instance answers its health check.",
                             ["backend"], registry=self.registry)
        self.load = Gauge("sageinfer_router:backend_load", "The router's open requests on an instance plus "
                          "the running and waiting requests it last reported beyond those.", ["backend"],
                          registry=self.registry)
        self.decisions = Counter("sageinfer_router:routing_decisions", "Requests routed, by the policy's reason "
                                 "(prefix: to the instance holding its prefix; least_load, round_robin, session).",
                                 ["reason"], registry=self.registry)
        self.prefix_query_tokens = Counter("sageinfer_router:prefix_query_tokens", "Prompt tokens the prefix "
                                           "policy measured against the instances' KV events.", registry=self.registry)
        self.prefix_hit_tokens = Counter("sageinfer_router:prefix_hit_tokens", "Of those, tokens the chosen "
                                         "instance reported holding (the router's expected prefix hits).",
                                         registry=self.registry)
        self.pool = pool

    def decision(self, reason: str, hit_tokens: int, prompt_tokens: int) -> None:
        self.decisions.labels(reason).inc()
        if prompt_tokens:
            self.prefix_query_tokens.inc(prompt_tokens)
            self.prefix_hit_tokens.inc(hit_tokens)

    def render(self) -> bytes:
        for b in self.pool.backends:
            self.healthy.labels(b.url).set(1 if b.healthy else 0)
            self.load.labels(b.url).set(b.load)
        return generate_latest(self.registry)


def build_router_app(pool: BackendPool, policy: Policy, max_attempts: int = 3) -> FastAPI:
    metrics = _Metrics(pool)
    policy.on_decision = metrics.decision
    pool.kv_index = policy.kv_index  # the instances' KV events, where the policy reads them
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    @asynccontextmanager
    async def lifespan(_):
        pool.start()
        yield
        await pool.stop()
        await client.aclose()

    app = FastAPI(title="sageInfer router", lifespan=lifespan)

    def choose(tried: set[str], session: str | None, body: dict, token_ids: list[int] | None) -> Backend | None:
        candidates = [b for b in pool.healthy() if b.url not in tried]
        return policy.pick(candidates, session, body, token_ids) if candidates else None

    async def forward(path: str, raw: Request):
        got = await json_body(raw)
        if isinstance(got, JSONResponse):
            return got
        body, parsed = got
        stream = bool(parsed.get("stream"))
        session = raw.headers.get(_SESSION_HEADER) or (parsed.get("user") if isinstance(parsed.get("user"), str)
                                                       else None)
        headers = {k: v for k, v in raw.headers.items() if k.lower() in _PASSED_HEADERS}

        def served(backend: Backend) -> None:
            backend.served += 1
            metrics.requests.labels(backend.url).inc()
        token_ids = await policy.token_ids(parsed)
        answer = await forward_to_pool(client, pool, lambda tried: choose(tried, session, parsed, token_ids), path,
                                       body, headers, stream, max_attempts, on_sent=served,
                                       on_retry=metrics.retries.inc)
        return answer or _error(503, "no instance is available to serve the request", "ServiceUnavailableError")

    add_openai_routes(app, forward, client, pool)

    # Instances join and leave at run time (a launcher, an autoscaler): POST or DELETE {"url": ...}.
    @app.get("/router/backends")
    async def list_backends():
        return [{"url": b.url, "healthy": b.healthy, "load": b.load, "served": b.served} for b in pool.backends]

    @app.get("/router/kv_index")
    async def kv_index():
        """What the router knows of each instance's prefix cache from its KV events."""
        index = policy.kv_index
        if index is None:
            return _error(404, "the router follows no KV events (--policy prefix --tokenizer DIR)", "NotFoundError")
        return {url: {"synced": state.synced, "blocks": len(state.blocks("GPU")),
                      "host_blocks": len(state.blocks("CPU")), "block_size": state.block_size}
                for url, state in index.instances.items()}

    @app.post("/router/backends")
    async def add_backend(raw: Request):
        url = await _url_of(raw)
        if isinstance(url, JSONResponse):
            return url
        pool.add(url)
        return {"url": url.rstrip("/"), "backends": len(pool.backends)}

    @app.delete("/router/backends")
    async def remove_backend(raw: Request):
        url = await _url_of(raw)
        if isinstance(url, JSONResponse):
            return url
        if not pool.remove(url):
            return _error(404, f"no instance {url!r} in the pool", "NotFoundError")
        return {"url": url, "backends": len(pool.backends)}

    @app.get("/health")
    async def health():
        up = len(pool.healthy())
        return JSONResponse({"healthy_backends": up, "backends": len(pool.backends)}, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _url_of(raw: Request):
    try:
        url = (await raw.json()).get("url")
    except (ValueError, AttributeError):
        url = None
    why = instance_url_error(url)
    if why is not None:
        return _error(400, f"send {{\"url\": \"http(s)://host:port\"}}: {why}", "BadRequestError")
    return url
