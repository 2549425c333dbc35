"""uvicorn, with the shutdown a supervisor expects.

SIGTERM / SIGINT: stop accepting, let open requests finish for up to the grace period, then end
the rest with an OpenAI error (a JSON 503, or an SSE error event followed by [DONE]) and exit 0.
A dead engine stops the server the same way and the process exits 1, so that it is restarted.
"""
from __future__ import annotations

import asyncio
import logging

import uvicorn

from sageinfer.engine.frontend import EngineFront, ServerShuttingDown
from sageinfer.gateway.uvicorn_server import CleanExitServer

logger = logging.getLogger(__name__)

# After the grace period: how long the ended requests get to send their error responses.
_FLUSH_SECONDS = 5.0


class EngineServer(CleanExitServer):
    def __init__(self, config: uvicorn.Config, engine: EngineFront, grace_seconds: float):
        config.timeout_graceful_shutdown = _FLUSH_SECONDS
        super().__init__(config)
        self.engine = engine
        self.grace_seconds = grace_seconds
        self.exit_code = 0

    def stop_on_dead_engine(self, exc: BaseException) -> None:
        """Called from the engine thread when its loop has died."""
        logger.error("the engine died (%s: %s); the server exits with status 1", type(exc).__name__, exc)
        self.exit_code = 1
        self.should_exit = True  # uvicorn's main loop polls this

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        self.engine.draining = True  # /health answers 503; a request on a kept-alive connection gets 503
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_seconds
        while self.engine.num_unfinished and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if self.engine.num_unfinished:
            logger.warning("grace period over: ending %d open requests", self.engine.num_unfinished)
            self.engine.fail_all(ServerShuttingDown(
                f"the server shut down before the request finished (grace period {self.grace_seconds:g} s)"))
        await super().shutdown(sockets)
