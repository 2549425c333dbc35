"""`sageinfer launch`: several instances of one model on this host and the router in front of them
(or, with --pd P:D, P prefill and D decode instances and the PD proxy), for a user with one box.
Each instance is a `sageinfer serve` process on its own port and device group (the platform's
visible-devices variable, CUDA_VISIBLE_DEVICES on NVIDIA); instances that must share a device split
its memory. An instance that exits is started again (the router takes it back once it answers);
SIGTERM stops them all. Several hosts: with --ray the instances are Ray actors placed on the
cluster's hosts (router/ray_instances.py), supervised the same way.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)
# An instance that exits is started again after 2 s, then 4, 8 ... up to a minute while it keeps
# failing; one that stayed up a minute starts from 2 s again.
_RESTART_BACKOFF_SECONDS, _MAX_BACKOFF_SECONDS = 2.0, 60.0


def device_groups(num_devices: int, instances: int, tp: int) -> list[str | None]:
    """The visible devices of each instance: whole groups of tp devices while there are enough, else
    instances share groups round-robin (None: no devices, the CPU)."""
    if num_devices == 0:
        return [None] * instances
    if num_devices < tp:
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} devices; {num_devices} visible")
    groups = [",".join(str(g * tp + i) for i in range(tp)) for g in range(num_devices // tp)]
    return [groups[i % len(groups)] for i in range(instances)]


def with_peers_visible(groups: list[str | None], num_devices: int) -> list[str | None]:
    """Each instance's own devices first (its ranks use those), then every other device, so that it
    can map a peer instance's memory (DeviceIpcConnector between instances on different devices)."""
    def order(group: str) -> str:
        own = group.split(",")
        return ",".join(own + [str(d) for d in range(num_devices) if str(d) not in own])
    return [None if g is None else order(g) for g in groups]


def child_devices(devices: str, inherited: str | None) -> str:
    """An instance's device indexes (counted among the devices this process sees) in the names its
    own visible-devices variable takes: this process may see only some devices itself."""
    names = [n.strip() for n in (inherited or "").split(",") if n.strip()]
    if not names:
        return devices
    return ",".join(names[int(i)] for i in devices.split(","))


class Instance:
    def __init__(self, args: list[str], port: int, devices: str | None, log_dir: str, devices_env: str | None = None,
                 kv_events: bool = False):
        """kv_events: publish KV events on ports of this host chosen at each start (the router reads
        them from the instance's /kv_events), so a port another process took meanwhile is never
        asked for again."""
        self.port, self.devices, self.devices_env, self.kv_events = port, devices, devices_env, kv_events
        self.url = f"http://127.0.0.1:{port}"
        self.args = args
        self.log_path = os.path.join(log_dir, f"instance-{port}.log")
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.backoff = _RESTART_BACKOFF_SECONDS
        self.restart_at: float | None = None

    def start(self) -> None:
        env = dict(os.environ)
        if self.devices is not None and self.devices_env:
            env[self.devices_env] = child_devices(self.devices, os.environ.get(self.devices_env))
        args = self.args + (kv_events_args("127.0.0.1") if self.kv_events else [])
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.started_at, self.restart_at = time.monotonic(), None
        logger.info("instance on port %d (devices %s): process %d, log %s", self.port, self.devices,
                    self.proc.pid, self.log_path)

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM (a server finishes what it has in flight), then SIGKILL after timeout seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


class Launcher:
    def __init__(self, model: str, instances: int, first_port: int, tp: int, serve_args: list[str],
                 log_dir: str, num_devices: int, instance_args: list[list[str]] | None = None,
                 devices_env: str | None = None, ray_devices: str | None = None, kv_events: bool = False,
                 on_moved=None, peers_visible: bool = False):
        """instance_args: flags for each instance on top of serve_args (a PD role, say); devices_env:
        the platform's variable that gives an instance its devices; peers_visible: each instance sees
        the others' devices too, after its own (for device-to-device KV transfer). ray_devices: start
        the instances as Ray actors holding tp of the cluster's devices of that resource ("GPU"; "" for
        none), each publishing its KV events on its node if kv_events; on_moved(old_url, new_url)
        hears of an actor started again on another node."""
        self._stopping = threading.Event()
        base = [sys.executable, "-m", "sageinfer.gateway.cli", "serve", model, "--tensor-parallel-size", str(tp)]
        own = instance_args or [[] for _ in range(instances)]
        if ray_devices is not None:
            from sageinfer.router.ray_instances import RayInstance
            self.instances = [RayInstance(base + list(serve_args) + own[i], i, tp, ray_devices or None, kv_events,
                                          on_moved) for i in range(instances)]
            return
        groups = device_groups(num_devices, instances, tp)
        sharing = len(set(groups)) < len(groups) and groups[0] is not None
        if peers_visible:
            groups = with_peers_visible(groups, num_devices)
        extra = list(serve_args)
        if sharing and not any(a.startswith("--gpu-memory-utilization") for a in extra):
            share = max(groups.count(g) for g in set(groups))
            extra += ["--gpu-memory-utilization", f"{0.9 / share:.3f}"]  # instances on one device split it
        self.instances = [Instance(base + ["--port", str(first_port + i)] + extra + own[i], first_port + i, g, log_dir,
                                   devices_env, kv_events) for i, g in enumerate(groups)]

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
        threading.Thread(target=self._supervise, name="sageinfer-launch-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            for instance in self.instances:
                code = instance.poll()
                if code is None or self._stopping.is_set():
                    continue
                if instance.restart_at is None:
                    if now - instance.started_at > _MAX_BACKOFF_SECONDS:
                        instance.backoff = _RESTART_BACKOFF_SECONDS
                    instance.restart_at = now + instance.backoff
                    logger.error("instance %s exited with %s; starting it again in %.0f s (log %s)",
                                 instance.url, code, instance.backoff, instance.log_path)
                    instance.backoff = min(2 * instance.backoff, _MAX_BACKOFF_SECONDS)
                elif now >= instance.restart_at:
                    instance.restarts += 1
                    instance.start()

    def stop(self) -> None:
        self._stopping.set()
        for instance in self.instances:
            instance.stop()


def router_follows_moves(router_url: str):
    """on_moved for a launcher in front of a router: the instance's old URL leaves the router's pool and
    the new one joins, through the router's own DELETE / POST /router/backends (called from the
    supervisor's thread, so the router's event loop does the change)."""
    def moved(old: str, new: str) -> None:
        import httpx
        try:
            httpx.request("DELETE", router_url + "/router/backends", json={"url": old}, timeout=5)
            httpx.post(router_url + "/router/backends", json={"url": new}, timeout=5).raise_for_status()
            logger.warning("an instance moved from %s to %s; the router follows", old, new)
        except httpx.HTTPError as exc:
            logger.error("an instance moved from %s to %s; telling the router failed: %s", old, new, exc)
    return moved


def free_port(host: str = "127.0.0.1") -> int:
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kv_events_args(host: str) -> list[str]:
    """An instance's --kv-events-config: events and snapshots on free ports of host, its address as
    the router reaches it."""
    return ["--kv-events-config", json.dumps({
        "enable_kv_cache_events": True, "endpoint": f"tcp://{host}:{free_port(host)}",
        "replay_endpoint": f"tcp://{host}:{free_port(host)}"})]


def pd_roles(spec: str) -> list[str]:
    """"P:D" -> P kv_producer then D kv_consumer instances."""
    try:
        prefill, decode = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--pd takes prefill:decode instance counts such as 1:2, got {spec!r}") from None
    if prefill < 1 or decode < 1:
        raise ValueError(f"--pd needs at least one prefill and one decode instance, got {spec!r}")
    return ["kv_producer"] * prefill + ["kv_consumer"] * decode


def instance_ports(router_port: int, first: int | None, instances: int) -> int:
    """The first instance's port (the others follow it): --first-instance-port, else the router's plus one,
    checked to fit below 65536 before anything starts (an instance refused its port, and was started again)."""
    if first is None:
        if router_port == 0:
            raise ValueError("--port 0 (any free port) gives the instances no ports to follow: "
                             "give --first-instance-port")
        first = router_port + 1
    if first < 1 or first + instances - 1 > 65535:
        raise ValueError(f"{instances} instance(s) from port {first} need ports up to {first + instances - 1}, "
                         "past 65535: lower --port or --first-instance-port")
    return first


def run(args) -> int:
    import tempfile

    import uvicorn

    from sageinfer.gateway.uvicorn_server import CleanExitServer, listening_socket
    from sageinfer.router.app import build_router_app
    from sageinfer.router.backends import BackendPool
    from sageinfer.router.policies import Policy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roles = pd_roles(args.pd) if args.pd else None
    instances = len(roles) if roles else args.instances
    if instances < 1:
        raise ValueError(f"--instances must be >= 1, got {instances}")
    first_port = instance_ports(args.port, args.first_instance_port, instances)
    listener = listening_socket(args.host, args.port)  # before Ray and the instances take ports of their own
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="sageinfer-launch-")
    os.makedirs(log_dir, exist_ok=True)
    instance_args = None
    if roles and args.kv_connector is None:
        args.kv_connector = "TorchDistributedConnector" if getattr(args, "ray", False) else "DeviceIpcConnector"
    if roles:
        instance_args = [["--kv-transfer-config", json.dumps({"kv_connector": args.kv_connector, "kv_role": role})]
                         for role in roles]
    policy = None
    ray_mode = getattr(args, "ray", False)
    if not roles and args.policy == "prefix":  # each instance publishes its KV events; the router follows them
        if any(a.startswith("--kv-events-config") for a in args.serve_args):
            raise ValueError("launch gives each instance its own --kv-events-config; do not pass one")
        try:
            policy = Policy("prefix", kv_events=True, tokenizer=args.model)
        except ValueError as exc:  # (a model directory of dummy weights, say)
            logger.warning("no tokenizer in %s (%s): the router measures token-id prompts only", args.model, exc)
            policy = Policy("prefix", kv_events=True)
    from sageinfer.platforms import get_platform
    platform = get_platform()
    router_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # how this host reaches it
    launcher = Launcher(args.model, instances, first_port,
                        args.tensor_parallel_size, args.serve_args, log_dir, platform.device_count() or 0,
                        instance_args, platform.visible_devices_env,
                        ray_devices=(platform.ray_device_resource or "") if ray_mode else None,
                        kv_events=policy is not None,
                        on_moved=None if roles else router_follows_moves(f"http://{router_host}:{args.port}"),
                        peers_visible=bool(roles) and args.kv_connector == "DeviceIpcConnector")
    launcher.start()
    if roles:
        from sageinfer.router.pd_proxy import build_pd_proxy_app
        urls = {role: [i.url for i, r in zip(launcher.instances, roles) if r == role]
                for role in ("kv_producer", "kv_consumer")}
        app = build_pd_proxy_app(BackendPool(urls["kv_producer"], check_interval=1.0),
                                 BackendPool(urls["kv_consumer"], check_interval=1.0),
                                 max_local_prefill_tokens=getattr(args, "max_local_prefill_tokens", 0))
        front = f"PD proxy over {args.pd} (prefill:decode, {args.kv_connector})"
    else:
        app = build_router_app(BackendPool([i.url for i in launcher.instances], check_interval=1.0),
                               policy or Policy(args.policy))
        front = f"router ({args.policy})"
    print(f"launched {instances} instance(s) of {args.model} (logs in {log_dir}); {front} on "
          f"http://{args.host}:{args.port}", flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    try:
        CleanExitServer(config).run(sockets=[listener])  # returns on SIGTERM / SIGINT
    finally:
        launcher.stop()
    return 0


