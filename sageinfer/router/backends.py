"""The instances behind the router: their health and load, kept current by a background loop that
asks each one's /health and reads its own /metrics (running and waiting requests), so load-aware
policies act on what the instances report, not on guesses."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

logger = logging.getLogger(__name__)

# Gauges read from an instance's /metrics: sageInfer's names, and vLLM's for vLLM instances.
_LOAD_GAUGES = {"num_requests_running", "num_requests_waiting"}


@dataclass
class Backend:
    url: str
    healthy: bool = False
    reported_load: float = 0.0   # running + waiting, from its /metrics at the last check
    in_flight: int = 0           # requests this router has open on it now
    in_flight_at_report: int = 0  # ... when that report was read
    last_seen: float = 0.0
    served: int = 0
    failures: int = 0
    kv_transfer: dict | None = None  # its /kv_transfer, read when it was admitted
    refused: str | None = None       # why the pool's admission keeps it out of rotation

    @property
    def load(self) -> float:
        """This router's open requests, now, plus what the last report held beyond those (other
        clients' work). The report lags by up to a check interval: requests of this router that
        ended since must not count, or one busy moment steers everything to the other instances."""
        return self.in_flight + max(0.0, self.reported_load - self.in_flight_at_report)


def instance_url_error(url) -> str | None:
    """Why url cannot name an instance (an http(s) URL with a host, ASCII without spaces), or None. An
    unparsable URL taken into the pool had failed its health checks with errors the loop did not expect."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return "an instance is an http(s) URL, such as http://host:port"
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        return f"an instance URL is printable ASCII without spaces, got {ascii(url)[:200]}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        return f"{ascii(url)[:200]} is not a URL: {exc}"
    if not parsed.host:
        return f"{url[:200]!r} names no host"
    if parsed.port is not None and not 0 < parsed.port <= 65535:
        return f"{url[:200]!r} names port {parsed.port}, outside 1-65535"
    return None


@dataclass
class BackendPool:
    urls: list[str]
    check_interval: float = 1.0
    timeout: float = 2.0
    backends: list[Backend] = field(default_factory=list)
    # Checked each time an instance comes up, with its /kv_transfer (None: it has no connector; known:
    # False where it has no such endpoint, as instances other than sageInfer's): why it must stay out
    # of rotation, or None.
    admit: Callable[[Backend, dict | None, bool], str | None] | None = None

    def __post_init__(self):
        self.backends = [Backend(u.rstrip("/")) for u in self.urls]
        self._task: asyncio.Task | None = None
        self.kv_index = None  # router.kv_index.KVEventIndex: follows the KV events of instances that publish them

    def add(self, url: str) -> Backend:
        url = url.rstrip("/")
        for b in self.backends:
            if b.url == url:
                return b
        backend = Backend(url)
        self.backends.append(backend)  # in rotation once its first health check passes
        return backend

    def remove(self, url: str) -> bool:
        before = len(self.backends)
        self.backends = [b for b in self.backends if b.url != url.rstrip("/")]
        if self.kv_index is not None:
            self.kv_index.forget(url.rstrip("/"))
        return len(self.backends) < before

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def mark_down(self, backend: Backend, why: str) -> None:
        if backend.healthy:
            logger.warning("backend %s is down: %s", backend.url, why)
        backend.healthy = False
        backend.failures += 1
        if self.kv_index is not None:
            self.kv_index.mark_stale(backend.url)

    async def check(self, client: httpx.AsyncClient, backend: Backend) -> None:
        try:
            health = await client.get(backend.url + "/health", timeout=self.timeout)
            up = health.status_code == 200
        except Exception as exc:  # noqa: BLE001 - whatever fails, this instance is down, the others unaffected
            up, health = False, exc
        if not up:
            return self.mark_down(backend, f"/health: {health}")
        if not backend.healthy:
            if self.admit is not None:
                refused = await self._admission(client, backend)
                if refused is not None:
                    if refused != backend.refused:
                        logger.error("backend %s is kept out of rotation: %s", backend.url, refused)
                    backend.refused = refused
                    return
                backend.refused = None
            logger.info("backend %s is up", backend.url)
        backend.healthy, backend.last_seen = True, time.monotonic()
        try:
            text = (await client.get(backend.url + "/metrics", timeout=self.timeout)).text
            backend.reported_load = _load_from_metrics(text)
            backend.in_flight_at_report = backend.in_flight
        except (httpx.HTTPError, ValueError):
            pass  # a server without readable metrics is still served by round robin
        if self.kv_index is not None:
            # Read at every check, not once: an instance started again (by a launcher) may publish its
            # events on other ports, and the index then follows those instead.
            try:
                answer = await client.get(backend.url + "/kv_events", timeout=self.timeout)
                if answer.status_code == 200:
                    self.kv_index.follow(backend.url, answer.json())
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                if not self.kv_index.is_following(backend.url):
                    logger.warning("backend %s: its KV event endpoints could not be read: %s", backend.url, exc)

    async def _admission(self, client: httpx.AsyncClient, backend: Backend) -> str | None:
        try:
            answer = await client.get(backend.url + "/kv_transfer", timeout=self.timeout)
            known = answer.status_code != 404
            info = answer.json().get("kv_transfer") if known else None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return f"/kv_transfer could not be read: {exc}"
        refused = self.admit(backend, info, known)
        if refused is None:
            backend.kv_transfer = info
        return refused

    async def run_checks(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                # One instance's unexpected error is logged; the loop, and the others' checks, go on.
                results = await asyncio.gather(*(self.check(client, b) for b in self.backends), return_exceptions=True)
                for backend, result in zip(list(self.backends), results):
                    if isinstance(result, Exception):
                        logger.error("health check of %s failed: %r", backend.url, result)
                await asyncio.sleep(self.check_interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run_checks())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.kv_index is not None:
            await self.kv_index.close()


def _load_from_metrics(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    load = 0.0
    for family in text_string_to_metric_families(text):
        if family.name.split(":")[-1] in _LOAD_GAUGES:
            load += sum(s.value for s in family.samples)
    return load
