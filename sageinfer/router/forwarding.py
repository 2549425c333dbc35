"""Sending a request on to one instance of a pool, shared by the router and the PD proxy: the
instance the caller picks, another one if it cannot be reached (nothing sent to the client yet),
the answer relayed as it comes (server-sent events) or whole."""
from __future__ import annotations

import json
from typing import Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sageinfer.router.backends import Backend, BackendPool

CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


async def json_body(raw: Request) -> tuple[bytes, dict] | JSONResponse:
    """The request's bytes and its JSON object, or the 400 to answer."""
    body = await raw.body()
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        return error(400, "the request body is not valid JSON", "BadRequestError")
    if not isinstance(parsed, dict):
        return error(400, "the request body must be a JSON object", "BadRequestError")
    return body, parsed


async def forward_to_pool(client: httpx.AsyncClient, pool: BackendPool, pick: Callable[[set[str]], Backend | None],
                          path: str, content: bytes, headers: dict, stream: bool, max_attempts: int,
                          on_sent: Callable[[Backend], None] | None = None,
                          on_retry: Callable[[], None] | None = None) -> Response | None:
    """The instance's answer, or None when no instance could be reached."""
    tried: set[str] = set()
    for _ in range(max_attempts):
        backend = pick(tried)
        if backend is None:
            break
        tried.add(backend.url)
        backend.in_flight += 1
        try:
            upstream = await client.send(client.build_request("POST", backend.url + path, content=content,
                                                              headers=headers), stream=True)
        except CONNECT_ERRORS as exc:
            backend.in_flight -= 1
            pool.mark_down(backend, f"{type(exc).__name__}: {exc}")
            if on_retry is not None:
                on_retry()
            continue
        if on_sent is not None:
            on_sent(backend)
        if not stream or upstream.status_code != 200:
            try:
                data = await upstream.aread()
            finally:
                await upstream.aclose()
                backend.in_flight -= 1
            return Response(data, status_code=upstream.status_code, media_type=upstream.headers.get("content-type"))
        return StreamingResponse(relay(upstream, backend, pool), media_type="text/event-stream")
    return None


async def models_of(client: httpx.AsyncClient, pool: BackendPool, raw: Request) -> Response:
    """/v1/models as the first healthy instance answers it."""
    headers = {k: v for k, v in raw.headers.items() if k.lower() == "authorization"}
    for backend in pool.healthy():
        try:
            resp = await client.get(backend.url + "/v1/models", headers=headers, timeout=5.0)
            return Response(resp.content, status_code=resp.status_code, media_type="application/json")
        except httpx.HTTPError as exc:
            pool.mark_down(backend, str(exc))
    return error(503, "no instance is available", "ServiceUnavailableError")


async def relay(upstream: httpx.Response, backend: Backend, pool: BackendPool):
    """The instance's server-sent events as they come; a stream cut off mid-way ends with an error
    event and [DONE], as the instances themselves end a failed stream."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        pool.mark_down(backend, f"stream cut off: {exc}")
        message = {"error": {"message": f"the instance serving this request failed: {type(exc).__name__}",
                             "type": "InternalServerError", "param": None, "code": 500}}
        yield f"data: {json.dumps(message)}\n\ndata: [DONE]\n\n".encode()
    finally:
        backend.in_flight -= 1
        await upstream.aclose()


def add_openai_routes(app: FastAPI, forward, client: httpx.AsyncClient, pool: BackendPool) -> None:
    """/v1/completions and /v1/chat/completions through forward(path, raw); /v1/models from the pool."""
    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await forward("/v1/completions", raw)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await forward("/v1/chat/completions", raw)

    @app.get("/v1/models")
    async def models(raw: Request):
        return await models_of(client, pool, raw)
