"""The asyncio side of an engine: admission, one output stream per request, and failure.

Two transports share it: the engine in a thread of this process (`AsyncEngine`) and the engine core
in a process of its own (`EngineCoreClient`). Either way, HTTP handlers never wait on a step.

Admission counts sequences (prompts x n), not HTTP requests: `add` registers a request's stream
synchronously on the event loop, so a check and the registration it allows cannot interleave with
another request's. A stream leaves the count when the engine finishes it or its consumer aborts it.

Failure: an error in one request's own processing fails that request (the engine reports it on the
output); an engine that can no longer step fails every open request with the reason, and `on_dead`
tells the server to exit.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from sageinfer.engine.input_processor import InputProcessor
from sageinfer.engine.stats import EngineMetrics
from sageinfer.outputs import RequestOutput
from sageinfer.sampling_params import SamplingParams


class EngineOverloaded(RuntimeError):
    """The waiting queue is over its limit; the client should retry later (HTTP 503)."""


class ServerShuttingDown(RuntimeError):
    """The server is stopping: it takes no new request, and ends those past the grace period (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine stopped on an error; no request can be served (HTTP 500, then the process exits)."""


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
    last_output_time: float = 0.0
    num_tokens_seen: int = 0


class RequestStream:
    """One request's outputs, as they come; `abort()` ends it early (idempotent)."""

    def __init__(self, front: "EngineFront", request_id: str, stream: _Stream):
        self.front, self.request_id, self._stream = front, request_id, stream
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Outputs are cumulative, so where several wait (a consumer behind the engine's steps) only
        the latest is yielded: one chunk for all of them, as a server under load wants."""
        queue, error = self._stream.queue, None
        try:
            while not self.finished:
                if error is not None:
                    item, error = error, None
                else:
                    item = await queue.get()
                while not isinstance(item, BaseException) and not item.finished and not queue.empty():
                    following = queue.get_nowait()
                    if isinstance(following, BaseException):
                        error = following  # after the output before it
                        break
                    item = following
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
            self.front.abort(self.request_id)


class EngineFront:
    def __init__(self, inputs: InputProcessor, max_num_seqs: int, max_waiting_requests: int,
                 on_dead: Callable[[BaseException], None] | None = None):
        self.inputs = inputs
        self.max_num_seqs = max_num_seqs
        self.max_waiting_requests = max_waiting_requests
        self.on_dead = on_dead
        self.metrics = EngineMetrics()
        self.error: BaseException | None = None
        self.draining = False
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()

    # ---- what a transport provides --------------------------------------------------------
    def _send(self, command: tuple) -> None:
        """("add", request_id, prompt dict, params, priority) or ("abort", request_id), to the engine."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    # ---- the event loop's side ------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_seqs_in_flight(self) -> int:
        return sum(s.num_seqs for s in list(self._streams.values()))

    @property
    def max_seqs_in_flight(self) -> int:
        return self.max_num_seqs + self.max_waiting_requests

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
                             f"most {limit} sequences (max_num_seqs {self.max_num_seqs} + "
                             f"max_waiting_requests {self.max_waiting_requests})")
        in_flight = self.num_seqs_in_flight
        if in_flight + num_seqs > limit:
            raise EngineOverloaded(f"{in_flight} sequences in flight and the waiting queue is full (max_num_seqs "
                                   f"{self.max_num_seqs} + max_waiting_requests {self.max_waiting_requests}); "
                                   "retry later")

    def add(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
            prompt_text: str | None = None, priority: int = 0) -> RequestStream:
        """Hand a tokenized, checked request to the engine. Call on the event loop, right after
        check_accepting and with no await in between."""
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), len(prompt_token_ids),
                         params.n)
        self._streams[request_id] = stream  # before the engine can answer (it may, from another thread)
        try:
            self._send(("add", request_id, {"prompt_token_ids": prompt_token_ids, "prompt": prompt_text}, params,
                        priority))
        except BaseException:
            self._streams.pop(request_id, None)  # never handed over: nothing to abort, nothing left open
            raise
        return RequestStream(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._send(("abort", request_id))

    def fail_all(self, exc: BaseException) -> None:
        """End every open request with exc (shutdown past its grace period); the engine aborts them."""
        for request_id, stream in list(self._streams.items()):
            stream.queue.put_nowait(exc)
            self.abort(request_id)

    # ---- outputs and failures, from whichever thread the transport delivers on --------------
    def _fail_request(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            num_tokens = sum(len(c.token_ids) for c in output.outputs)
            if stream.first_token_time is None and num_tokens:
                stream.first_token_time = now
                self.metrics.observe_first_token(now - stream.arrival)
            elif num_tokens > stream.num_tokens_seen:
                self.metrics.observe_tokens(now - stream.last_output_time, num_tokens - stream.num_tokens_seen)
            stream.last_output_time, stream.num_tokens_seen = now, num_tokens
            item: RequestOutput | BaseException = output
            if output.error is not None:
                item = ValueError(output.error) if output.bad_request else \
                    RequestFailed(f"the request failed: {output.error}")
            elif output.finished:
                self.metrics.observe_finished(output, stream.arrival, stream.first_token_time, now,
                                              stream.num_prompt_tokens)
            if output.finished:
                self._streams.pop(output.request_id, None)
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():  # one wake-up of a loop a step, not one a request
            loop.call_soon_threadsafe(_put_all, items)

    def _die(self, exc: BaseException, reason: str) -> None:
        """The engine can no longer step: fail everyone with the reason, then tell the server."""
        if self.error is not None:
            return
        self.error = exc
        dead = EngineDead(f"the engine stopped: {reason}")
        for request_id in list(self._streams):
            self._fail_request(request_id, dead)
        if self.on_dead is not None:
            self.on_dead(exc)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
