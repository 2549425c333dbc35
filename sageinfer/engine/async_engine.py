"""The engine core in its own thread, with an asyncio front: HTTP handlers never wait on a step,
and the step loop never waits on HTTP.

Hand-off: commands (add, abort) go through a thread-safe queue; outputs come back to each
request's asyncio.Queue through loop.call_soon_threadsafe. A request whose consumer goes away
(client disconnect) is aborted and its KV blocks freed.

Admission counts sequences (prompts x n), not HTTP requests: `add` registers a request's stream
synchronously on the event loop, so a check and the registration it allows cannot interleave with
another request's. A stream leaves the count when the engine finishes it or its consumer aborts it.

Failure: an error in one request's own processing fails that request (the engine reports it on
the output); an error in the step loop leaves the engine unusable, so every open request fails
with the reason and `on_dead` tells the server to exit.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from sageinfer.engine.engine import LLMEngine, PromptType
from sageinfer.engine.stats import EngineMetrics
from sageinfer.outputs import RequestOutput
from sageinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is over its limit; the client should retry later (HTTP 503)."""


class ServerShuttingDown(RuntimeError):
    """The server is stopping: it takes no new request, and ends those past the grace period (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; no request can be served (HTTP 500, then the process exits)."""


class RequestFailed(RuntimeError):
    """This request's own processing failed; the engine serves the others (HTTP 500)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    num_seqs: int
    first_token_time: float | None = None
    tokens_seen: dict = field(default_factory=dict)


class RequestStream:
    """One request's outputs, as they come; `abort()` ends it early (idempotent)."""

    def __init__(self, engine: "AsyncEngine", request_id: str, stream: _Stream):
        self.engine, self.request_id, self._stream = engine, request_id, stream
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024,
                 on_dead: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_dead = on_dead
        self.metrics = EngineMetrics()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.draining = False
        self._thread = threading.Thread(target=self._run, name="sageinfer-engine", daemon=True)
        self._thread.start()

    # ---- front (event loop side) ---------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_seqs_in_flight(self) -> int:
        return sum(s.num_seqs for s in list(self._streams.values()))

    @property
    def max_seqs_in_flight(self) -> int:
        return self.engine.config.max_num_seqs + self.max_waiting_requests

    def check_accepting(self, num_seqs: int = 1) -> None:
        """Raise unless num_seqs more sequences can be taken now: ValueError for a request that can
        never fit, EngineOverloaded for one that fits later, and why not for a dead or stopping engine."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        if self.draining:
            raise ServerShuttingDown("the server is shutting down and takes no new requests")
        limit = self.max_seqs_in_flight
        if num_seqs > limit:
            raise ValueError(f"n must be at most {limit} in all (prompts x n = {num_seqs}): the server holds at "
                             f"most {limit} sequences (max_num_seqs {self.engine.config.max_num_seqs} + "
                             f"max_waiting_requests {self.max_waiting_requests})")
        in_flight = self.num_seqs_in_flight
        if in_flight + num_seqs > limit:
            raise EngineOverloaded(f"{in_flight} sequences in flight and the waiting queue is full (max_num_seqs "
                                   f"{self.engine.config.max_num_seqs} + max_waiting_requests "
                                   f"{self.max_waiting_requests}); retry later")

    def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
            prompt_text: str | None = None) -> RequestStream:
        """Hand a tokenized, checked request to the engine. Call on the event loop, right after
        check_accepting and with no await in between."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), len(prompt_token_ids),
                         params.n)
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, {"prompt_token_ids": prompt_token_ids, "prompt": prompt_text},
                            params))
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs of one request until it finishes; abort it if the consumer leaves."""
        prompt_text, prompt_ids = self.engine.tokenize_prompt(prompt)
        self.check_accepting(params.n)
        async for output in self.add(prompt_ids, params, request_id, prompt_text):
            yield output

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))

    def fail_all(self, exc: BaseException) -> None:
        """End every open request with exc (shutdown past its grace period); the engine aborts them."""
        for request_id, stream in list(self._streams.items()):
            stream.queue.put_nowait(exc)
            self.abort(request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # ---- core (engine thread) ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._drain_commands(block=not self.engine.has_unfinished_requests()):
                    self.metrics.observe_engine(self.engine)  # aborts free blocks even when idle
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._dispatch(outputs)
                    self.metrics.observe_engine(self.engine)
        except BaseException as exc:  # noqa: BLE001 - the engine is unusable: fail everyone, then exit
            logger.exception("engine loop stopped")
            self.error = exc
            dead = EngineDead(f"the engine stopped: {type(exc).__name__}: {exc}")
            for request_id, stream in list(self._streams.items()):
                self._streams.pop(request_id, None)
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
            if self.on_dead is not None:
                self.on_dead(exc)

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; True if there were any."""
        try:
            command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params = command
            stream = self._streams.get(request_id)
            if stream is None:  # gone before it started
                return
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time=stream.arrival)
            except Exception as exc:  # noqa: BLE001 - a request that can't be added fails alone
                if not isinstance(exc, ValueError):
                    logger.exception("request %s could not be added", request_id)
                    exc = RequestFailed(f"the request could not be started: {type(exc).__name__}: {exc}")
                self._streams.pop(request_id, None)
                self.engine.abort_request(request_id)  # whatever part of it was added
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            generated = sum(len(c.token_ids) for c in output.outputs)
            if stream.first_token_time is None and generated:
                stream.first_token_time = now
                self.metrics.ttft.observe(now - stream.arrival)
            item: RequestOutput | BaseException = output
            if output.error is not None:
                item = RequestFailed(f"the request failed: {output.error}")
            elif output.finished:
                self.metrics.observe_finished(output, stream.arrival, stream.first_token_time, now,
                                              stream.num_prompt_tokens)
            if output.finished:
                self._streams.pop(output.request_id, None)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
