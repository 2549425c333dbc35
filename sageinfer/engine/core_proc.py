"""The engine core process: the scheduler, the KV cache and the step loop, away from the HTTP
process's GIL. It takes commands on one ZMQ socket and sends each step's output differences (and
the engine's gauges) on another; the front end (`core_client.EngineCoreClient`) binds both.

A failure in one request's processing fails that request; a failure of the loop sends `Dead` with
the reason and exits 1. The process also exits when the front end that started it is gone.
"""
from __future__ import annotations

import logging
import os
import sys

import msgspec
import zmq

from sageinfer.config import EngineConfig
from sageinfer.engine import core_messages as msg
from sageinfer.engine.stats import engine_snapshot

logger = logging.getLogger("sageinfer.engine_core")

_IDLE_POLL_MS = 100
_TRANSFER_POLL_MS = 5


def run_engine_core(config: EngineConfig, attention_backend: str | None, command_address: str,
                    output_address: str, parent_pid: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine core: %(message)s")
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(command_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 2000)  # the last message (Dead) still goes out when we exit
    outputs.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    try:
        from sageinfer.engine.engine import LLMEngine
        # only what is new crosses to the front end: no whole outputs a step
        engine = LLMEngine(config, show_progress=False, attention_backend=attention_backend, output_kind="delta")
        outputs.send(encoder.encode(msg.Ready(os.getpid(), engine.config.max_model_len,
                                              engine.model_config.vocab_size, engine.config.max_num_seqs,
                                              engine.num_kv_blocks, engine.config.block_size,
                                              engine.kv_transfer_description())))
        code = _loop(engine, commands, outputs, encoder, parent_pid)
        engine.shutdown()
    except BaseException as exc:  # noqa: BLE001 - the engine is unusable: say why, then exit non-zero
        logger.exception("the engine core stopped")
        outputs.send(encoder.encode(msg.Dead(f"{type(exc).__name__}: {exc}")))
        code = 1
    outputs.close()
    commands.close(linger=0)
    context.term()
    sys.exit(code)


def _loop(engine, commands: zmq.Socket, outputs: zmq.Socket, encoder: msgspec.msgpack.Encoder,
          parent_pid: int) -> int:
    decoder = msgspec.msgpack.Decoder(msg.Command)
    deltas = msg.DeltaEncoder(token_deltas=engine.output_kind == "delta")
    while True:
        busy = engine.has_unfinished_requests()
        transfers = engine.has_pending_transfers()  # KV held for, or arriving from, another instance
        changed = False
        if commands.poll(0 if busy else (_TRANSFER_POLL_MS if transfers else _IDLE_POLL_MS)):
            while True:
                try:
                    command = decoder.decode(commands.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                changed = True
                if isinstance(command, msg.AddRequest):
                    prompt = {"prompt_token_ids": command.prompt_token_ids, "prompt": command.prompt}
                    error = engine.add_request_or_error(command.request_id, prompt, command.params,
                                                        priority=command.priority)
                    if error is not None:
                        bad_request = isinstance(error, ValueError)
                        message = str(error) if bad_request else (
                            f"the request could not be started: {type(error).__name__}: {error}")
                        outputs.send(encoder.encode(msg.RequestError(command.request_id, message, bad_request)))
                elif isinstance(command, msg.AbortRequest):
                    engine.abort_request(command.request_id)
                    deltas.forget(command.request_id)
                else:
                    return 0
        elif not busy and os.getppid() != parent_pid:
            logger.error("the front end is gone; the engine core exits")
            return 1
        step_outputs = engine.step() if engine.has_unfinished_requests() or transfers else []
        # Aborts, and KV transfers that end, free blocks even when idle: the gauges must say so.
        if step_outputs or changed or (transfers and not engine.has_pending_transfers()):
            gauges, counters = engine_snapshot(engine)
            outputs.send(encoder.encode(msg.StepOutputs([deltas.encode(o) for o in step_outputs], gauges,
                                                        counters)))
