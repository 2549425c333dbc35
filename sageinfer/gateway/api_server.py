"""OpenAI-compatible HTTP server (FastAPI): completions, chat, models, health, metrics, tokenize."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import sageinfer
from sageinfer.engine.frontend import (EngineDead, EngineFront, EngineOverloaded, RequestFailed, RequestStream,
                                       ServerShuttingDown)
from sageinfer.engine.input_processor import TemplateKwargsError
from sageinfer.gateway import openai_format as fmt
from sageinfer.gateway.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, error_body
from sageinfer.gateway.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest)
from sageinfer.gateway.reasoning import REASONING_PARSERS, ReplyThinking
from sageinfer.gateway.tool_calls import TOOL_PARSERS, ToolCallOutput
from sageinfer.sampling_params import SamplingParams

# Exceptions that end a request with an OpenAI error: (HTTP status, error type).
_ERROR_STATUS: dict[type, tuple[int, str]] = {
    ValueError: (400, "BadRequestError"),
    EngineOverloaded: (503, "ServiceUnavailableError"),
    ServerShuttingDown: (503, "ServiceUnavailableError"),
    RequestFailed: (500, "InternalServerError"),
    EngineDead: (500, "InternalServerError"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# The names a parameter error may start with (other messages may start with any word).
_PARAMETERS = ({f.name for f in dataclasses.fields(SamplingParams)} | set(CompletionRequest.model_fields)
               | set(ChatCompletionRequest.model_fields))


def _param_of(message: str) -> str | None:
    """SamplingParams' and the requests' errors start with the parameter's name."""
    first = message.split(" ", 1)[0].rstrip(":")
    return first if first in _PARAMETERS else None


class OpenAIServer:
    def __init__(self, engine: EngineFront, served_model_name: str, chat_template: str | None = None,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 prompt_tokens_details: bool = False):
        self.engine = engine
        # usage.prompt_tokens_details.cached_tokens in answers (off by default, as vLLM: it tells one client
        # what other clients' prompts left in the cache)
        self.prompt_tokens_details = prompt_tokens_details
        # tool_choice "auto" reads tool calls out of the text with this parser (None: refused)
        self.tool_parser = TOOL_PARSERS[tool_call_parser]() if tool_call_parser else None
        # a reasoning model's thinking, split from its answer (None: all of it is the content)
        self.reasoning_parser = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
        self.inputs = engine.inputs
        self.max_model_len = engine.inputs.max_model_len
        self.tokenizer = self.inputs.tokenizer
        self.model_name = served_model_name
        engine.metrics.model_name = served_model_name
        if chat_template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = chat_template
        # the block's closing token, after which a grammar binds (None: not one token, so a grammar binds at once)
        self.reasoning_end_id = self.reasoning_parser.end_token_id(self.tokenizer) \
            if self.reasoning_parser is not None and self.tokenizer is not None else None
        self.created = int(time.time())
        # Tokenizing, chat templates and decoding run here, off the event loop (a long prompt must not
        # stall /health or other requests). One thread: HF tokenizers are not safe to share between
        # threads that encode at once.
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sageinfer-tokenizer")
        # No token covers more characters than the longest vocabulary entry, so a text longer than this
        # has more tokens than the context holds; twice the bound leaves room for normalizers.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) if self.tokenizer else 1
        self.max_prompt_chars = 2 * longest * self.max_model_len

    async def in_tokenizer_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, *args)

    def _check_text_length(self, num_chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit the context whatever its tokens."""
        if num_chars > self.max_prompt_chars:
            raise APIError(400, f"the {param} has {num_chars} characters, more than any prompt of "
                                f"{self.max_model_len} tokens (max_model_len) can have", param)

    # ---- request checks -----------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           "model", "NotFoundError")

    def encode_prompts(self, prompts: list, truncate: int | None = None) -> list[dict]:
        """Token ids (and text) of each prompt, checked against the context length; with truncate,
        only the last `truncate` tokens are kept."""
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str) and truncate is None:
                self._check_text_length(len(prompt), "prompt")
            try:
                text, ids = self.inputs.tokenize_prompt(prompt)
            except ValueError as exc:
                raise APIError(400, str(exc), "prompt") from exc
            encoded.append(self._fit(text, ids, truncate))
        return encoded

    def _fit(self, text: str | None, ids: list[int], truncate: int | None) -> dict:
        """The engine prompt: the last `truncate` tokens if asked (the text no longer matches them then),
        checked against the context length."""
        if truncate is not None and len(ids) > truncate:
            text, ids = None, ids[-truncate:]
        self._check_length(ids)
        return {"prompt_token_ids": ids, "prompt": text}

    def _check_length(self, ids: list[int]) -> None:
        limit = self.max_model_len
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt")
        if len(ids) > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                                f"{len(ids)} tokens.", "prompt")

    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[dict, str]:
        """The engine prompt of a conversation, and its text as rendered (before any truncation)."""
        messages = [m.for_template() for m in req.messages]
        truncate = req.truncate_prompt_tokens
        if truncate is None:
            self._check_text_length(sum(len(m["content"]) + len(m.get("reasoning_content") or "")
                                        for m in messages), "messages")
        try:
            text, ids = self.inputs.render_chat(messages, req.add_generation_prompt, tools=req.tool_schemas(),
                                                template_kwargs=req.chat_template_kwargs,
                                                continue_final_message=req.continue_final_message)
        except TemplateKwargsError as exc:
            raise APIError(400, str(exc), "chat_template_kwargs") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from exc
        return self._fit(text, ids, truncate), text

    # ---- generation -------------------------------------------------------------------------
    def start(self, prompts: list[dict], params, request_id: str, priority: int = 0) -> list[RequestStream]:
        """Admit a request's prompts (x n) as a whole or not at all; no await in here, so no other
        request is admitted between the check and the hand-off."""
        self.inputs.check_sampling_params(params)
        self.engine.check_accepting(len(prompts) * params.n)
        streams = []
        try:
            for i, p in enumerate(prompts):
                streams.append(self.engine.add(p["prompt_token_ids"], params, f"{request_id}-{i}", p["prompt"],
                                               priority))
        except BaseException:
            for stream in streams:  # the prompts already handed over would run for nobody
                stream.abort()
            raise
        return streams

    @staticmethod
    async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
        """Outputs of several prompts' requests as they come: (prompt index, RequestOutput). Leaving
        early (an error, a disconnect) aborts all of them."""
        if len(streams) == 1:  # the usual request: no relay task and queue in between
            try:
                async for out in streams[0]:
                    yield 0, out
            finally:
                streams[0].abort()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream):
            try:
                async for out in stream:
                    await queue.put((i, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, exc))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
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
            for stream in streams:
                stream.abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        try:
            params = req.sampling_params(self.inputs.sampling_defaults)
            self.inputs.check_priority(req.priority)
            raw_prompts = req.prompts()
            if params.kv_transfer_params and len(raw_prompts) > 1:
                raise ValueError("kv_transfer_params go with a single prompt")
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from exc
        self.engine.check_accepting(len(raw_prompts) * params.n)  # refuse early what cannot be taken
        prompts = await self.in_tokenizer_thread(self.encode_prompts, raw_prompts, req.truncate_prompt_tokens)
        echo_text = [""] * len(prompts)
        if req.echo:
            echo_text = await self.in_tokenizer_thread(
                lambda: [p["prompt"] or self._decode(p["prompt_token_ids"]) for p in prompts])
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self.start(prompts, params, request_id, req.priority)
        n = params.n
        k = req.logprobs or 0
        base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)

        def choice(i: int, out, c, text: str, start: int, end: int, finished: bool, first: bool) -> dict:
            logprobs = None
            if req.logprobs is not None:
                logprobs = fmt.completion_logprobs(c, start, end, k, len(echo_text[i]))
                if req.echo and first:  # the prompt's tokens come first, in the chunk that echoes it
                    first_text = self._decode(out.prompt_token_ids[:1])
                    logprobs = fmt.merge_logprobs(
                        fmt.echo_logprobs(out.prompt_token_ids, out.prompt_logprobs, k, first_text), logprobs)
            body = {"index": i * n + c.index, "text": text, "logprobs": logprobs,
                    "finish_reason": c.finish_reason if finished else None,
                    "stop_reason": c.stop_reason if finished else None}
            if req.prompt_logprobs is not None and first:
                body["prompt_logprobs"] = fmt.prompt_logprobs(out.prompt_logprobs)
            return body

        if req.stream:
            async def events():
                tracker = fmt.DeltaTracker(max((len(s) for s in params.stop), default=1) - 1,
                                           req.logprobs is not None or self.tokenizer is None)
                completion_tokens = 0
                usage = fmt.RunningUsage(req.stream_options, prompt_tokens)
                cached = [0] * len(prompts)
                async for i, out in self.merged(streams):
                    cached[i] = out.num_cached_tokens
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
                        yield _sse({**base, "choices": [choice(i, out, c, text, start, end, finished, first)],
                                    **usage.of(index, end)})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": fmt.usage(prompt_tokens, completion_tokens,
                                                                          self._cached(sum(cached)))})
                yield "data: [DONE]\n\n"
            return _EngineStream(_with_error_event(events()), streams)

        finals = await self._collect(streams, raw)
        choices, completion_tokens = [], 0
        for i, out in enumerate(finals):
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(choice(i, out, c, echo_text[i] + c.text, 0, len(c.token_ids), True, True))
        body = {**base, "choices": sorted(choices, key=lambda x: x["index"]),
                "usage": fmt.usage(prompt_tokens, completion_tokens,
                                   self._cached(sum(out.num_cached_tokens for out in finals)))}
        if len(finals) == 1 and finals[0].kv_transfer_params is not None:
            body["kv_transfer_params"] = finals[0].kv_transfer_params  # for the decode instance (PD)
        return body

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        try:
            params = req.sampling_params(self.inputs.sampling_defaults)
            self.inputs.check_priority(req.priority)
        except ValueError as exc:
            raise APIError(400, str(exc), _param_of(str(exc))) from exc
        tool_choice = req.effective_tool_choice
        if tool_choice == "auto" and self.tool_parser is None:
            raise APIError(400, 'tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                                '--tool-call-parser', "tool_choice")
        tools = ToolCallOutput(tool_choice, self.tool_parser, req.parallel_tool_calls)
        self.engine.check_accepting(params.n)
        prompt, prompt_text = await self.in_tokenizer_thread(self.chat_prompt, req)
        thinking = self._thinking_of(prompt_text, params, req.include_reasoning)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.start([prompt], params, request_id, req.priority)
        k = req.top_logprobs or 0
        base = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        prompt_tokens = len(prompt["prompt_token_ids"])

        if req.stream:
            async def events():
                tracker = fmt.DeltaTracker(max((len(s) for s in params.stop), default=1) - 1,
                                           req.logprobs or self.tokenizer is None)
                completion_tokens = 0
                usage = fmt.RunningUsage(req.stream_options, prompt_tokens)
                for index in range(params.n):
                    yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                        {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}], **usage.of(index, 0)})
                splitters = [tools.stream() for _ in range(params.n)]
                thoughts = [thinking.stream() for _ in range(params.n)]
                cached = 0
                async for _, out in self.merged(streams):
                    cached = out.num_cached_tokens
                    for c in out.outputs:
                        d = tracker.delta(c.index, c)
                        if d is None:
                            continue
                        text, start, end, finished = d
                        if finished:
                            completion_tokens += len(c.token_ids)
                        reasoning, text = thoughts[c.index].feed(text, finished)
                        delta, finish_reason = splitters[c.index].delta(text, finished, c.finish_reason)
                        delta = {**thinking.fields(reasoning), **delta}
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [{
                            "index": c.index, "delta": delta,
                            "logprobs": fmt.chat_logprobs(c, start, end, k) if req.logprobs else None,
                            "finish_reason": finish_reason}], **usage.of(c.index, end)})
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                "usage": fmt.usage(prompt_tokens, completion_tokens, self._cached(cached))})
                yield "data: [DONE]\n\n"
            return _EngineStream(_with_error_event(events()), streams)

        (out,) = await self._collect(streams, raw)
        choices = []
        for c in out.outputs:
            reasoning, content = thinking.split(c.text)
            message, finish_reason = tools.message(content or "", c.finish_reason)
            if content is None and message["content"] == "":
                message["content"] = None  # all of it was thinking
            message.update(thinking.fields(reasoning))
            choices.append({"index": c.index, "message": message,
                            "logprobs": fmt.chat_logprobs(c, 0, len(c.token_ids), k) if req.logprobs else None,
                            "finish_reason": finish_reason, "stop_reason": c.stop_reason})
        body = {**base, "object": "chat.completion", "choices": choices,
                "usage": fmt.usage(prompt_tokens, sum(len(c.token_ids) for c in out.outputs),
                                   self._cached(out.num_cached_tokens))}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = fmt.prompt_logprobs(out.prompt_logprobs)
        if out.kv_transfer_params is not None:
            body["kv_transfer_params"] = out.kv_transfer_params  # for the decode instance (PD)
        return body

    def _cached(self, num_tokens: int) -> int | None:
        return num_tokens if self.prompt_tokens_details else None

    def _thinking_of(self, prompt_text: str, params, include: bool) -> ReplyThinking:
        """How a chat reply's thinking is told apart: with a reasoning parser, the output begins in it where the
        prompt leaves a block open; a grammar then binds only after the block's end (the thinking runs free)."""
        parser = self.reasoning_parser
        if parser is None:
            return ReplyThinking(None, False, include)
        in_reasoning = parser.starts_in_reasoning(prompt_text)
        spec = params.structured_outputs
        if in_reasoning and spec is not None:
            if self.reasoning_end_id is None:  # the format binds from the first token: no thinking comes
                in_reasoning = False
            else:
                params.structured_outputs = dataclasses.replace(spec, after_token_id=self.reasoning_end_id)
        return ReplyThinking(parser, in_reasoning, include)

    async def _collect(self, streams: list[RequestStream], raw: Request) -> list:
        """Final outputs of all prompts; aborted as soon as the client disconnects."""
        finals: list = [None] * len(streams)

        async def gather():
            async for i, out in self.merged(streams):
                finals[i] = out

        async def client_gone():
            while (await raw.receive())["type"] != "http.disconnect":
                await asyncio.sleep(0.01)

        work, watch = asyncio.create_task(gather()), asyncio.create_task(client_gone())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
            for stream in streams:
                stream.abort()
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected", kind="ClientDisconnected")
        work.result()
        return finals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""


class _EngineStream(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends, also if it never started
    (the client was gone before the headers went out)."""

    def __init__(self, events: AsyncIterator[str], streams: list[RequestStream]):
        super().__init__(events, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.abort()


def _status_of(exc: BaseException) -> tuple[int, str]:
    for kind, status in _ERROR_STATUS.items():
        if isinstance(exc, kind):
            return status
    return 500, "InternalServerError"


async def _with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has started its status is sent; a failure after that becomes an OpenAI error
    event, and the stream still ends with [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the client
        status, kind = _status_of(exc)
        yield _sse(error_body(status, str(exc) or type(exc).__name__, kind))
        yield "data: [DONE]\n\n"


# Characters JSON leaves raw in strings that line readers (Python's splitlines, httpx's aiter_lines) take
# for line ends: escaped, an event whose text holds one stays on its one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


def build_app(server: OpenAIServer, api_key: str | None = None, public_metrics: bool = False,
              max_request_body_bytes: int = 32 * 2**20, kv_events: dict | None = None,
              kv_transfer: dict | None = None) -> FastAPI:
    """kv_events: where the engine publishes its KV cache events (with its block size), for routers.
    kv_transfer: its KV transfer connector's description, for PD proxies (None: it has none)."""
    app = FastAPI(title="sageInfer", docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:  # added last, so it runs first: no body is read for a caller without the key
        app.add_middleware(APIKeyMiddleware, api_key=api_key,
                           public_paths=("/health", "/ping", "/version", "/kv_transfer", "/metrics", "/kv_events")
                           if public_metrics else ("/health", "/ping", "/version", "/kv_transfer"))

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(error_body(exc.status, exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           "BadRequestError"), status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return JSONResponse(error_body(400, message or "invalid request", "BadRequestError",
                                       ".".join(loc) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "RequestTooLarge" if exc.status_code == 413 else "HTTPError"
        return JSONResponse(error_body(exc.status_code, str(exc.detail), kind), status_code=exc.status_code)

    for error_type in _ERROR_STATUS:
        @app.exception_handler(error_type)
        async def engine_error(_, exc: Exception):
            status, kind = _status_of(exc)
            param = _param_of(str(exc)) if status == 400 else None
            return JSONResponse(error_body(status, str(exc), kind, param), status_code=status)

    @app.get("/health")
    async def health():
        healthy = server.engine.error is None and not server.engine.draining
        return Response(status_code=200 if healthy else 503)

    @app.api_route("/ping", methods=["GET", "POST"])  # the health check's name on SageMaker-style hosts
    async def ping():
        return await health()

    @app.get("/version")
    async def version():
        return {"version": sageinfer.__version__}

    @app.get("/kv_transfer")
    async def kv_transfer_description():
        # public, as /health is: a PD proxy checks it before pairing instances (nothing in it is secret:
        # each request's kv_transfer_params carry the same)
        return {"kv_transfer": kv_transfer}

    @app.get("/kv_events")
    async def kv_events_endpoints():
        if kv_events is None:
            return JSONResponse(error_body(404, "this instance publishes no KV events (--kv-events-config)",
                                           "NotFoundError"), status_code=404)
        return {k: kv_events[k] for k in ("endpoint", "replay_endpoint", "topic", "block_size")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "sageinfer",
                                            "max_model_len": server.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(server.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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
            chat_request = ChatCompletionRequest(messages=req.messages, chat_template_kwargs=req.chat_template_kwargs)
            ids = (await server.in_tokenizer_thread(server.chat_prompt, chat_request))[0]["prompt_token_ids"]
        elif req.prompt is not None:
            server._check_text_length(len(req.prompt), "prompt")
            ids = await server.in_tokenizer_thread(
                lambda: server.inputs.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens))
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        if server.tokenizer is None:
            raise APIError(400, "the server runs without a tokenizer", "tokens")
        vocab = server.inputs.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
        return {"prompt": await server.in_tokenizer_thread(server.tokenizer.decode, req.tokens)}

    return app
