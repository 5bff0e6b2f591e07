"""The tensor-parallel process group: who am I, how many of us, and the three collectives TP needs.

One process per GPU (`torchrun --nproc-per-node N`): NCCL on CUDA, gloo on CPU (CI). Every rank
runs the same modules in the same order, so collectives always match up. Inference only: the
collectives here are not differentiable.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def shard_range(n: int, rank: int, world: int, what: str = "dimension") -> tuple[int, int]:
    """[start, stop) of rank's equal share of n items; n must divide evenly."""
    if n % world:
        raise ValueError(f"{what} {n} is not divisible by the tensor-parallel size {world}")
    step = n // world
    return rank * step, (rank + 1) * step


@dataclass
class TPGroup:
    """rank / size of this process in the tensor-parallel group, its device and process group.

    `size == 1` makes every collective a no-op (the TP model then equals the plain model).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n] per rank -> [..., size * n], rank r's piece at columns [r*n, (r+1)*n)."""
        if self.size == 1:
            return x
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 name
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # concatenated along dim 0 (gloo + NCCL)
        gather(out, x, group=self.group)
        return out.view(self.size, *x.shape).movedim(0, -2).flatten(-2)  # [N, ..., n] -> [..., N * n]

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy rank src's x to every rank, in place; returns x."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            if self.device.type == "cuda":
                dist.barrier(group=self.group, device_ids=[self.device.index])
            else:
                dist.barrier(group=self.group)


def init_tp(backend: str | None = None, timeout_s: float = 600.0) -> TPGroup:
    """Join the group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the env).

    CUDA: NCCL, one GPU per local rank. NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 is
    set unless the environment already sets it, and never switched on here.
    Without WORLD_SIZE (a plain `python` run) returns a one-rank group with no process group.
    """
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1 and not dist.is_initialized():
        return TPGroup(0, 1, device, None)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if cuda else {}
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"),
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return TPGroup(dist.get_rank(), dist.get_world_size(), device, dist.group.WORLD)
