"""uvicorn's server, exiting 0 after a graceful shutdown on SIGTERM or SIGINT (uvicorn itself
re-raises the signal afterwards, so the process would end by the signal before its own clean-up);
and the listening socket, bound before the slow part of start-up."""
from __future__ import annotations

import contextlib
import signal
import socket

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


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound at once: an engine's load or a launcher's instances take tens of
    seconds, during which other processes (Ray's, the instances', their event publishers) bind free
    ports of their own and could take this one. A taken port fails here, before that work, with the
    address named. Not inherited by child processes. Pass it to `server.run(sockets=[...])`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
