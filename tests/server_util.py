"""Start `sageinfer serve` in a subprocess on a free loopback port and wait until it is healthy."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports, below Linux's ephemeral range (32768 on), where
    no bind to port 0 and no outgoing connection takes one meanwhile: `launch` numbers its instances'
    ports from the first (a port after a free_port() was once taken by the time an instance bound it)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32768 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports found")


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value of a Prometheus exposition (labels dropped: one model per server)."""
    from prometheus_client.parser import text_string_to_metric_families
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels.keys() - {"model_name"}}


def labelled_counter(base_url: str, family: str, label: str) -> dict[str, float]:
    """label value -> count, of one counter family in a server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {s.labels[label]: s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples if s.name.endswith("_total")}


class ServerProcess:
    def __init__(self, model_dir: str, *extra: str, api_key: str | None = "sk-test", env: dict | None = None,
                 startup_seconds: float = 300, entry: list[str] | None = None, port: int | None = None):
        """entry: the command that takes serve's arguments (default: `python -m sageinfer.gateway.cli serve`)."""
        self.port = port or free_port()
        tls = "--ssl-certfile" in extra
        self.base_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.api_key = api_key
        entry = entry or [sys.executable, "-m", "sageinfer.gateway.cli", "serve"]
        args = [*entry, model_dir, "--port", str(self.port),
                "--dtype", "float32", "--num-gpu-blocks-override", "400", "--served-model-name", "tiny", *extra]
        if api_key and not (env and "SAGEINFER_API_KEY" in env):
            args += ["--api-key", api_key]
        self.log = open(os.path.join(os.path.dirname(model_dir), f"server-{self.port}.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1, verify=not tls).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {startup_seconds} s; log:\n{self.log_tail()}")

    def log_tail(self, num_chars: int = 3000) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-num_chars:]

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.base_url + "/metrics", headers=self.headers, timeout=10).text)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class CliProcess:
    """A `sageinfer` command serving HTTP (router, proxy) on a free loopback port, once /health is 200."""

    def __init__(self, *command: str, startup_seconds: float = 60):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "sageinfer.gateway.cli", *command, "--port", str(self.port),
                "--health-check-interval", "0.3"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"`sageinfer {command[0]}` did not become healthy")

    def counter(self, family: str, label: str) -> dict[str, float]:
        """label value -> count, of one counter family in /metrics."""
        return labelled_counter(self.base_url, family, label)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
