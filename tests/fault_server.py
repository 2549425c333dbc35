"""`sageinfer serve` with two faults planted, for the fault tests (run as a script, arguments as serve's).
The engine core process is spawned from this script too, so the faults are planted there as well.

- A request whose prompt starts with DETOK_FAULT fails in its own detokenization (a per-request
  failure: the engine must go on serving the others).
- A step that holds a request whose prompt starts with STEP_FAULT raises (the engine loop dies: the
  server must fail what is in flight and exit non-zero).
- A step that holds a request whose prompt starts with SLOW_STEPS takes 5 ms more: such a request
  outlasts a shutdown's grace period or a kill on any device (a GPU decodes the tiny model in well
  under a millisecond a token).
"""
import sys
import time

from sageinfer.engine import engine as engine_module
from sageinfer.engine.core_client import EngineCoreClient
from sageinfer.engine.core_proc import run_engine_core
from sageinfer.engine.detokenizer import IncrementalDetokenizer
from sageinfer.gateway.cli import main

DETOK_FAULT = [401, 402, 403]
STEP_FAULT = [404, 405, 406]
SLOW_STEPS = [407, 408, 409]


def _starts_with(ids, marker) -> bool:
    return list(ids[:len(marker)]) == marker


_original_init = IncrementalDetokenizer.__init__
_original_add = IncrementalDetokenizer.add_token
_original_step = engine_module.LLMEngine.step


def _init(self, tokenizer, prompt_token_ids, *args, **kwargs):
    _original_init(self, tokenizer, prompt_token_ids, *args, **kwargs)
    self.planted_fault = _starts_with(prompt_token_ids, DETOK_FAULT)


def _add_token(self, token_id, check_stop):
    if self.planted_fault:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted detokenizer fault")
    return _original_add(self, token_id, check_stop)


def _step(self):
    if any(_starts_with(r.prompt_token_ids, STEP_FAULT) for r in self.scheduler.running):
        raise RuntimeError("planted step fault")
    if any(_starts_with(r.prompt_token_ids, SLOW_STEPS) for r in self.scheduler.running):
        time.sleep(0.005)
    return _original_step(self)


def faulty_core(*args):
    """The engine core's entry point, from this module: importing it in the child plants the faults."""
    run_engine_core(*args)


IncrementalDetokenizer.__init__ = _init
IncrementalDetokenizer.add_token = _add_token
engine_module.LLMEngine.step = _step
EngineCoreClient.core_main = staticmethod(faulty_core)

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
