"""The engine core in its own thread, with an asyncio front: HTTP handlers never wait on a step,
and the step loop never waits on HTTP.

Hand-off: commands (add, abort) go through a thread-safe queue; outputs come back to each
request's asyncio.Queue through loop.call_soon_threadsafe. A request whose consumer goes away
(client disconnect) is aborted and its KV blocks freed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from sageinfer.engine.engine import LLMEngine, PromptType
from sageinfer.engine.stats import EngineMetrics
from sageinfer.outputs import RequestOutput
from sageinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is over its limit; the client should retry later (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    first_token_time: float | None = None
    tokens_seen: dict = field(default_factory=dict)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.metrics = EngineMetrics()
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sageinfer-engine", daemon=True)
        self._thread.start()

    # ---- front (event loop side) ---------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def check_accepting(self, num_new: int = 1) -> None:
        """Raise unless num_new more requests can be taken now."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        if len(self._streams) + num_new > self.engine.config.max_num_seqs + self.max_waiting_requests:
            raise EngineOverloaded(f"{len(self._streams)} requests in flight and the waiting queue is full "
                                   f"(max_num_seqs {self.engine.config.max_num_seqs} + max_waiting_requests "
                                   f"{self.max_waiting_requests}); retry later")

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs of one request until it finishes; abort it if the consumer leaves."""
        self.check_accepting()
        request_id = request_id or f"req-{next(self._ids)}"
        _, prompt_ids = self.engine.tokenize_prompt(prompt)  # validates before the hand-off
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic(), len(prompt_ids))
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, {"prompt_token_ids": prompt_ids,
                                                "prompt": prompt if isinstance(prompt, str) else None}, params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))
            self._streams.pop(request_id, None)

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
        except BaseException as exc:  # keep the server answering: fail every open request with the reason
            logger.exception("engine loop stopped")
            self.error = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDead(f"the engine stopped: {exc}"))

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
            except ValueError as exc:
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
            if output.finished:
                self.metrics.observe_finished(output, stream.arrival, stream.first_token_time, now,
                                              stream.num_prompt_tokens)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)
