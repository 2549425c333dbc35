"""`sageinfer launch --ray`: the instances as Ray actors, on whichever hosts of a Ray cluster have
their devices (the cluster RAY_ADDRESS names, or a local head). Each actor runs `sageinfer serve` as
a child process on its node, with the devices Ray gave it, on a free port of that node, listening on
its address; the router (on this host) reaches it there. The actor's handle gives the launcher the
same start / poll / stop it has for a local process, so supervision and restarts are the same.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time

from sageinfer.router.launcher import free_port, kv_events_args, stop_process

logger = logging.getLogger(__name__)


class _ServeProcess:
    """Lives in the Ray actor: one `sageinfer serve` child process on the actor's node."""

    def __init__(self):
        self.proc = None
        self.placed: tuple[list[str], str, str] | None = None  # the command, URL and log, once chosen

    def start(self, args: list[str], kv_events: bool, log_name: str) -> tuple[str, str]:
        """Start the process; again after an exit, on the same port (the router knows that URL)."""
        import ray
        host = ray.util.get_node_ip_address()
        if self.placed is None:
            port = free_port(host)
            args = args + ["--host", host, "--port", str(port)]
            self.placed = (args, f"http://{host}:{port}", os.path.join(tempfile.gettempdir(), log_name))
        args, url, log_path = self.placed
        if kv_events:
            # Published on this node's address, where the router subscribes, on ports chosen at each
            # start: another instance on the node may have bound the last ones meanwhile (a free port is
            # only free until someone binds it), and the router reads them from /kv_events anew.
            args = args + kv_events_args(host)
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        return url, log_path

    def poll(self):
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float) -> None:
        stop_process(self.proc, timeout)


class RayInstance:
    """One instance as a Ray actor holding `tp` of the cluster's devices (none on CPU platforms)."""

    def __init__(self, args: list[str], index: int, tp: int, device_resource: str | None, kv_events: bool,
                 on_moved=None):
        """on_moved(old_url, new_url): called when a new actor (its node was lost) serves elsewhere."""
        from sageinfer.executor.ray_ranks import device_actor_options, ray_cluster
        ray = ray_cluster()
        options = device_actor_options(device_resource, tp, tp, f"an instance needs {tp}")
        self._ray, self._actor_class = ray, ray.remote(**options)(_ServeProcess)
        self.args, self.index, self.kv_events, self.on_moved = args, index, kv_events, on_moved
        self.actor = None
        self.url = self.port = self.log_path = None
        self.restarts, self.started_at = 0, 0.0
        self.backoff, self.restart_at = 2.0, None

    def start(self) -> None:
        """Start (or, after an exit, start again) and wait until the actor has placed the process."""
        if self.actor is None:
            self.actor = self._actor_class.remote()
        url, self.log_path = self._ray.get(self.actor.start.remote(
            self.args, self.kv_events, f"sageinfer-instance-{self.index}.log"))
        old, self.url = self.url, url
        self.port = int(url.rsplit(":", 1)[1])
        if old is not None and url != old:  # (a new actor: its node was lost)
            if self.on_moved is not None:
                self.on_moved(old, url)
            else:
                logger.error("instance %d now serves on %s; the front keeps %s", self.index, url, old)
        self.started_at, self.restart_at = time.monotonic(), None
        logger.info("instance %d: Ray actor, %s, log %s", self.index, self.url, self.log_path)

    def poll(self):
        """The process's exit code, None while it runs; -1 once the actor (or its node) is gone."""
        if self.actor is None:
            return -1
        try:
            return self._ray.get(self.actor.poll.remote(), timeout=10)
        except Exception as exc:  # a lost node or actor: a new actor, wherever Ray places it
            logger.error("instance %d: its Ray actor is gone (%s)", self.index, exc)
            self.actor = None
            return -1

    def stop(self, timeout: float = 30.0) -> None:
        if self.actor is not None:
            try:
                self._ray.get(self.actor.stop.remote(timeout), timeout=timeout + 5)
            except Exception as exc:
                logger.warning("instance %d: stopping its Ray actor: %s", self.index, exc)
