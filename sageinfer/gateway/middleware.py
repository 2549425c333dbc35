"""ASGI middleware in front of the OpenAI app: the API key and the request body's size.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one wraps `receive`, after which a
handler can no longer see its client disconnect, and a non-streaming request would run on for
nobody.
"""
from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


async def send_json_error(send: Send, status: int, message: str, kind: str) -> None:
    body = json.dumps(error_body(status, message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Every route needs `Authorization: Bearer KEY`, except /health (and /metrics, if it is public).
    The key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: tuple[str, ...] = ("/health",)):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send_json_error(send, 401, "Invalid or missing API key.", "AuthenticationError")
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Refuses a body over max_bytes with 413 before it is read into memory: at once from its
    Content-Length, or as soon as a chunked body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes (--max-request-body-bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_json_error(send, 413, self._too_large(), "RequestTooLarge")
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI lets an HTTPException out of body parsing; the app's handler answers 413.
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted_receive, send)
