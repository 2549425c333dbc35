"""uvicorn's server, exiting 0 after a graceful shutdown on SIGTERM or SIGINT (uvicorn itself
re-raises the signal afterwards, so the process would end by the signal before its own clean-up)."""
from __future__ import annotations

import contextlib
import signal

import uvicorn


class CleanExitServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
