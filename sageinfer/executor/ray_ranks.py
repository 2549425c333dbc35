"""Tensor-parallel ranks 1..N-1 as Ray actors (`distributed_executor_backend="ray"`), for ranks on
several hosts of a Ray cluster (or a local Ray head): Ray places them and gives each its device;
rank 0 stays in the engine's process. Steps and the torch.distributed rendezvous go over TCP.

Connects to the cluster named by RAY_ADDRESS, or starts a local head. The actors belong to the
engine's process: Ray ends them when it exits.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def ray_cluster():
    try:
        import ray
    except ImportError:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    return ray


def device_actor_options(resource: str | None, per_actor: int, total: int, what: str) -> dict:
    """ray.remote options for an actor holding per_actor devices of the platform's Ray resource
    (None: no devices); raises, saying what, when the cluster has fewer than total of them."""
    options = {"num_cpus": 0}
    if resource is None:
        return options
    have = ray_cluster().cluster_resources().get(resource, 0)
    if have < total:
        raise ValueError(f"the Ray cluster has {have} {resource}s; {what}")
    if resource == "GPU":
        options["num_gpus"] = per_actor
    else:
        options["resources"] = {resource: per_actor}
    return options


def node_address() -> str:
    """This host's address as the other ranks reach it."""
    return ray_cluster().util.get_node_ip_address()


class RayRanks:
    def __init__(self, config):
        ray = ray_cluster()
        from sageinfer.platforms import get_platform
        resource = get_platform(config.device).ray_device_resource
        self.uses_devices = resource is not None
        needed = config.tensor_parallel_size - 1
        options = device_actor_options(resource, 1, needed,
                                       f"tensor_parallel_size {config.tensor_parallel_size} needs {needed} "
                                       "beside this process's")

        class RankActor:
            def run(self, args: tuple) -> None:
                from sageinfer.executor.workers import run_worker
                run_worker(*args)

        self._actor_class = ray.remote(**options)(RankActor)
        self.actors, self.loops = {}, {}

    def start(self, rank: int, args: tuple) -> None:
        actor = self._actor_class.options(name=None).remote()
        # The actor's device is its device 0 (Ray narrows the visible devices to it).
        self.actors[rank] = actor
        self.loops[rank] = actor.run.remote(args + ((0 if self.uses_devices else None),))
        logger.info("tensor-parallel rank %d: Ray actor %s", rank, actor)

    def alive(self, rank: int) -> bool:
        ray = ray_cluster()
        done, _ = ray.wait([self.loops[rank]], timeout=0)
        return not done  # the loop returns only at shutdown, or with the actor's failure

    def why(self, rank: int) -> str:
        ray = ray_cluster()
        try:
            ray.get(self.loops[rank], timeout=0)
            return "its loop returned"
        except Exception as exc:  # noqa: BLE001 - the actor's own failure, reported
            return f"{type(exc).__name__}: {exc}"[:500]

    def stop(self, timeout: float) -> None:
        ray = ray_cluster()
        ray.wait(list(self.loops.values()), num_returns=len(self.loops), timeout=timeout)
        for actor in self.actors.values():
            ray.kill(actor)
