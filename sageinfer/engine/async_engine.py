"""The engine in a thread of this process, behind the asyncio front (`frontend.EngineFront`).

Commands (add, abort) go through a thread-safe queue; outputs come back to each request's
asyncio.Queue through loop.call_soon_threadsafe. The server runs the engine core in its own process
by default (`core_client.EngineCoreClient`); this transport is the in-process alternative
(`--engine-in-thread`), which shares the GIL with the HTTP loop.
"""
from __future__ import annotations

import logging
import queue
import threading

from sageinfer.engine.engine import LLMEngine
from sageinfer.engine.frontend import EngineFront, RequestFailed

logger = logging.getLogger(__name__)


class AsyncEngine(EngineFront):
    def __init__(self, engine: LLMEngine, max_waiting_requests: int = 1024, on_dead=None):
        super().__init__(engine.inputs, engine.config.max_num_seqs, max_waiting_requests, on_dead)
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sageinfer-engine", daemon=True)
        self._thread.start()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self.engine.shutdown()

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.engine.has_unfinished_requests() and not self.engine.has_pending_transfers()
                if self._drain_commands(block=idle):
                    self.metrics.observe_engine(self.engine)  # aborts free blocks even when idle
                if self.engine.has_unfinished_requests() or self.engine.has_pending_transfers():
                    outputs = self.engine.step()
                    self._deliver(outputs)
                    self.metrics.observe_engine(self.engine)
        except BaseException as exc:  # noqa: BLE001 - the engine is unusable: fail everyone, then exit
            logger.exception("engine loop stopped")
            self._die(exc, f"{type(exc).__name__}: {exc}")

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
            _, request_id, prompt, params, priority = command
            stream = self._streams.get(request_id)
            if stream is None:  # gone before it started
                return
            error = self.engine.add_request_or_error(request_id, prompt, params, stream.arrival, priority)
            if error is not None:
                self._fail_request(request_id, error if isinstance(error, ValueError) else RequestFailed(
                    f"the request could not be started: {type(error).__name__}: {error}"))
        elif kind == "abort":
            self.engine.abort_request(command[1])

