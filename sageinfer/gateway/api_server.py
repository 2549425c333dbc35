"""OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics, tokenize."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sageinfer.engine.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from sageinfer.gateway import openai_format as fmt
from sageinfer.gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(status: int, message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _param_of(message: str) -> str | None:
    """SamplingParams errors start with the parameter's name."""
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
                 chat_template: str | None = None):
        self.engine = engine
        self.core = engine.engine
        self.tokenizer = self.core.tokenizer
        self.model_name = served_model_name
        self.api_key = api_key
        if chat_template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = chat_template
        self.created = int(time.time())

    # ---- request checks -----------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           "model", "NotFoundError")

    def encode_prompts(self, prompts: list) -> list[dict]:
        """Token ids (and text) of each prompt, checked against the context length."""
        encoded = []
        for prompt in prompts:
            try:
                text, ids = self.core.tokenize_prompt(prompt)
            except ValueError as exc:
                raise APIError(400, str(exc), "prompt") from exc
            self._check_length(ids)
            encoded.append({"prompt_token_ids": ids, "prompt": text})
        return encoded

    def _check_length(self, ids: list[int]) -> None:
        limit = self.core.config.max_model_len
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt")
        if len(ids) > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(ids)} tokens.", "prompt")

    def chat_prompt(self, req: ChatCompletionRequest) -> dict:
        if self.tokenizer is None:
            raise APIError(400, "chat needs a tokenizer; the server runs with --skip-tokenizer-init", "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model has no chat template; start the server with --chat-template FILE",
                           "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # a template error is the request's fault (e.g. roles out of order)
            raise APIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_length(ids)
        return {"prompt_token_ids": ids, "prompt": text}

    # ---- generation -------------------------------------------------------------------------
    async def merged(self, prompts: list[dict], params, request_id: str) -> AsyncIterator[tuple[int, object]]:
        """Outputs of several prompts' requests as they come: (prompt index, RequestOutput)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, prompt: dict):
            try:
                async for out in self.engine.generate(prompt, params, f"{request_id}-{i}"):
                    await queue.put((i, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, exc))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        try:
            params = req.sampling_params()
            prompts = self.encode_prompts(req.prompts())
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from exc
        self.engine.check_accepting(len(prompts) * params.n)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        n = params.n
        k = req.logprobs or 0
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        echo_text = [(p["prompt"] or self._decode(p["prompt_token_ids"])) if req.echo else "" for p in prompts]

        def choice(i: int, c, text: str, start: int, end: int, finished: bool) -> dict:
            return {"index": i * n + c.index, "text": text,
                    "logprobs": fmt.completion_logprobs(c, start, end, k) if req.logprobs is not None else None,
                    "finish_reason": c.finish_reason if finished else None,
                    "stop_reason": c.stop_reason if finished else None}

        if req.stream:
            async def events():
                tracker = fmt.DeltaTracker(max((len(s) for s in params.stop), default=1) - 1,
                                           req.logprobs is not None or self.tokenizer is None)
                completion_tokens = 0
                async for i, out in self.merged(prompts, params, request_id):
                    for c in out.outputs:
                        index = i * n + c.index
                        first = index not in tracker.sent_tokens
                        d = tracker.delta(index, c)
                        if d is None:
                            continue
                        text, start, end, finished = d
                        if finished:
                            completion_tokens += len(c.token_ids)
                        text = (echo_text[i] if first else "") + text
                        yield _sse({**base, "choices": [choice(i, c, text, start, end, finished)]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": fmt.usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(_with_error_event(events()), media_type="text/event-stream")

        finals = await self._collect(prompts, params, request_id, raw)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(choice(i, c, echo_text[i] + c.text, 0, len(c.token_ids), True))
        return {**base, "choices": sorted(choices, key=lambda x: x["index"]),
                "usage": fmt.usage(prompt_tokens, completion_tokens)}

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        try:
            params = req.sampling_params(None)
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from exc
        prompt = self.chat_prompt(req)
        self.engine.check_accepting(params.n)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        k = req.top_logprobs or 0
        base = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        prompt_tokens = len(prompt["prompt_token_ids"])

        if req.stream:
            async def events():
                tracker = fmt.DeltaTracker(max((len(s) for s in params.stop), default=1) - 1,
                                           req.logprobs or self.tokenizer is None)
                completion_tokens = 0
                for index in range(params.n):
                    yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
                async for _, out in self.merged([prompt], params, request_id):
                    for c in out.outputs:
                        d = tracker.delta(c.index, c)
                        if d is None:
                            continue
                        text, start, end, finished = d
                        if finished:
                            completion_tokens += len(c.token_ids)
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [{
                            "index": c.index, "delta": {"content": text} if text else {},
                            "logprobs": fmt.chat_logprobs(c, start, end, k) if req.logprobs else None,
                            "finish_reason": c.finish_reason if finished else None}]})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                "usage": fmt.usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(_with_error_event(events()), media_type="text/event-stream")

        (out,) = await self._collect([prompt], params, request_id, raw)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": fmt.chat_logprobs(c, 0, len(c.token_ids), k) if req.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return {**base, "object": "chat.completion", "choices": choices,
                "usage": fmt.usage(prompt_tokens, sum(len(c.token_ids) for c in out.outputs))}

    async def _collect(self, prompts: list[dict], params, request_id: str, raw: Request) -> list:
        """Final outputs of all prompts; aborted if the client disconnects first."""
        finals: list = [None] * len(prompts)

        async def gather():
            async for i, out in self.merged(prompts, params, request_id):
                finals[i] = out

        task = asyncio.create_task(gather())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected", kind="ClientDisconnected")
        task.result()
        return finals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


async def _with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has started its status is sent; a failure after that becomes an error event."""
    try:
        async for event in events:
            yield event
    except (ValueError, EngineDead, EngineOverloaded) as exc:
        status = 400 if isinstance(exc, ValueError) else 500
        yield _sse(_error_body(status, str(exc), type(exc).__name__))
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="sageInfer", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization") != f"Bearer {server.api_key}":
                return JSONResponse(_error_body(401, "Invalid or missing API key.", "AuthenticationError"),
                                    status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(_error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(_error_body(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                            "BadRequestError"), status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return JSONResponse(_error_body(400, message or "invalid request", "BadRequestError",
                                        ".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(_error_body(exc.status_code, str(exc.detail), "HTTPError"), status_code=exc.status_code)

    @app.exception_handler(EngineOverloaded)
    async def overloaded(_, exc: EngineOverloaded):
        return JSONResponse(_error_body(503, str(exc), "ServiceUnavailableError"), status_code=503)

    @app.exception_handler(EngineDead)
    async def dead(_, exc: EngineDead):
        return JSONResponse(_error_body(500, str(exc), "InternalServerError"), status_code=500)

    @app.exception_handler(ValueError)
    async def value_error(_, exc: ValueError):
        return JSONResponse(_error_body(400, str(exc), "BadRequestError", _param_of(str(exc))), status_code=400)

    @app.get("/health")
    async def health():
        return Response(status_code=500 if server.engine.error is not None else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "sageinfer",
                                            "max_model_len": server.core.config.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await server.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await server.chat(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if server.tokenizer is None:
            raise APIError(400, "the server runs without a tokenizer", "prompt")
        if req.messages is not None:
            ids = server.chat_prompt(ChatCompletionRequest(messages=req.messages))["prompt_token_ids"]
        elif req.prompt is not None:
            ids = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.core.config.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        if server.tokenizer is None:
            raise APIError(400, "the server runs without a tokenizer", "tokens")
        vocab = server.core.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    return app
