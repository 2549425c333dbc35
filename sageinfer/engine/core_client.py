"""The front end of an engine core that runs in its own process (`core_proc.run_engine_core`).

This process keeps the tokenizer and the request checks; the core process holds the model. Commands
go out on a ZMQ PUSH socket (from the event loop only); a receiver thread takes the core's messages,
rebuilds each request's cumulative output from its differences, and watches the process: if it
exits without a word (kill -9, an out-of-memory kill), every open request fails and `on_dead` is
called, as when it reports its own death.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import tempfile
import threading
import time

import msgspec
import zmq

from sageinfer.config import EngineConfig
from sageinfer.engine import core_messages as msg
from sageinfer.engine.core_proc import run_engine_core
from sageinfer.engine.frontend import EngineFront, RequestFailed
from sageinfer.engine.input_processor import InputProcessor, load_tokenizer
from sageinfer.models.generation_defaults import load_generation_defaults

logger = logging.getLogger(__name__)


class _InBackground:
    """fn() run on a daemon thread (one that never holds up the process's exit); result() waits for it
    and returns its value or raises its exception."""

    def __init__(self, fn):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="sageinfer-front-load", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class EngineCoreClient(EngineFront):
    # The process's entry point; replaceable (a subclass, a test that plants faults in the core).
    core_main = staticmethod(run_engine_core)

    def __init__(self, config: EngineConfig, attention_backend: str | None = None, max_waiting_requests: int = 1024,
                 on_dead=None, startup_timeout: float = 3600.0):
        self._dir = tempfile.mkdtemp(prefix="sageinfer-core-")
        command_address, output_address = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/outputs"
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(command_address)
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(msg.CoreMessage)
        # spawn, not fork: a forked child would inherit this process's threads and any device context.
        # Not a daemon: it starts processes of its own (tensor-parallel ranks). It exits on Shutdown, on
        # its own failure, or when it finds this process gone; atexit sends the Shutdown.
        self.process = multiprocessing.get_context("spawn").Process(
            target=type(self).core_main, name="sageinfer-engine-core", daemon=False,
            args=(config, attention_backend, command_address, output_address, os.getpid()))
        self.process.start()
        self._stopping = False
        atexit.register(self.shutdown)
        # The tokenizer (seconds of imports and loading) loads while the core starts, not after it.
        front_inputs = _InBackground(lambda: (
            None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer),
            load_generation_defaults(config.model, config.generation_config)))
        ready = self._wait_ready(startup_timeout)
        tokenizer, defaults = front_inputs.result()
        super().__init__(InputProcessor(tokenizer, ready.vocab_size, ready.max_model_len, config.max_logprobs, defaults,
                                        config.scheduling_policy),
                         ready.max_num_seqs, max_waiting_requests, on_dead)
        self.ready = ready
        self._assembler = msg.OutputAssembler()
        self._receiver = threading.Thread(target=self._receive, name="sageinfer-core-receiver", daemon=True)
        self._receiver.start()

    def _wait_ready(self, timeout: float) -> msg.Ready:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._outputs.poll(200):
                message = self._decoder.decode(self._outputs.recv())
                if isinstance(message, msg.Ready):
                    return message
                if isinstance(message, msg.Dead):
                    self._close()
                    raise RuntimeError(f"the engine core failed to start: {message.reason}")
            elif not self.process.is_alive():
                self._close()
                raise RuntimeError(f"the engine core process exited with code {self.process.exitcode} "
                                   "while starting")
        self._close()
        raise RuntimeError(f"the engine core did not start within {timeout:g} s")

    # ---- the event loop's side ------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        if self.error is not None:
            return
        if command[0] == "add":
            _, request_id, prompt, params, priority = command
            try:
                encoded = self._encoder.encode(
                    msg.AddRequest(request_id, prompt["prompt_token_ids"], prompt["prompt"], params, priority))
            except UnicodeEncodeError as exc:  # (the one text msgspec refuses: a lone surrogate)
                raise ValueError(f"the request holds text that is not valid Unicode: {exc}") from exc
            self._assembler.start(request_id, prompt["prompt"], prompt["prompt_token_ids"], params.n)
        else:
            self._assembler.forget(command[1])
            encoded = self._encoder.encode(msg.AbortRequest(command[1]))
        self._commands.send(encoded)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._context.closed:
            return
        self._stopping = True
        if self.process.is_alive():
            try:
                self._commands.send(self._encoder.encode(msg.Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)
        if hasattr(self, "_receiver"):
            self._receiver.join(timeout)
        self._close()

    def _close(self) -> None:
        self._commands.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        for name in ("commands", "outputs"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass

    # ---- the receiver thread --------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            if self._outputs.poll(200):
                message = self._decoder.decode(self._outputs.recv())
                if isinstance(message, msg.StepOutputs):
                    self.metrics.observe_snapshot(message.gauges, message.counters)
                    outputs = [self._assembler.apply(delta) for delta in message.outputs]
                    self._deliver([o for o in outputs if o is not None])
                elif isinstance(message, msg.RequestError):
                    self._assembler.forget(message.request_id)
                    error = ValueError(message.message) if message.bad_request else RequestFailed(message.message)
                    self._fail_request(message.request_id, error)
                elif isinstance(message, msg.Dead):
                    logger.error("the engine core stopped: %s", message.reason)
                    self._die(RuntimeError(message.reason), message.reason)
                    return
            elif not self.process.is_alive():
                if not self._stopping:
                    reason = f"the engine core process exited with code {self.process.exitcode}"
                    logger.error(reason)
                    self._die(RuntimeError(reason), reason)
                return
