"""The tensor-parallel group this process belongs to, and the collectives the layers need.

One group per process, set once at start-up (`init_tensor_parallel`) before the model is built:
parallel layers read it when they size their shards. Without it the group is a single rank and
every collective is a no-op, so tp=1 pays nothing. The backend is the platform's (gloo on CPU,
NCCL on CUDA; HCCL and the other vendors' later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: object = None  # torch.distributed process group of the ranks

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def split(self, total: int) -> int:
        """This rank's share of total (which must divide evenly)."""
        if total % self.size:
            raise ValueError(f"{total} does not split over tensor_parallel_size {self.size}")
        return total // self.size


_GROUP = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _GROUP


def init_tensor_parallel(rank: int, size: int, backend: str, init_method: str) -> TensorParallelGroup:
    """Join the group of `size` ranks as `rank` (a process per rank)."""
    global _GROUP
    if size > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
        _GROUP = TensorParallelGroup(rank, size, dist.group.WORLD)
    else:
        _GROUP = TensorParallelGroup()
    return _GROUP


def destroy_tensor_parallel() -> None:
    """Leave the group (an engine that shuts down); models built after this are whole again."""
    global _GROUP
    if _GROUP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = TensorParallelGroup()


def kv_head_range(num_kv_heads: int, tp: TensorParallelGroup | None = None) -> tuple[int, int]:
    """(first, count) of the KV heads this rank holds. With fewer KV heads than ranks, each KV head is
    replicated on the ranks whose query heads read it."""
    tp = tp or _GROUP
    if num_kv_heads >= tp.size:
        count = tp.split(num_kv_heads)
        return tp.rank * count, count
    if tp.size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated evenly over {tp.size} ranks")
    return tp.rank * num_kv_heads // tp.size, 1
