"""DDP under torchrun: process group from the environment, metric reduction, rank-0-only writes.

    torchrun --nproc_per_node 8 -m kdkit train student ...                 # one machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m kdkit train ...

Each rank reads its own 1/world of the shards (the DALI loader takes shard_id / num_shards from
torch.distributed), batch_size is per rank, and only rank 0 writes the run folder. Without
torchrun's variables everything here is a no-op and training runs in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from kdkit.errors import KdkitError
            raise KdkitError("--device cuda: no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def reduce_sum(values: list[float] | torch.Tensor, info: DistInfo) -> list[float]:
    """Element-wise sum over ranks (float64, so sample counts and sums stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if info.enabled:
        t = t.to(info.device) if info.device.type == "cuda" else t
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any (so all ranks stop together)."""
    return reduce_sum([float(flag)], info)[0] > 0


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. per-rank RNG states for a checkpoint)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, so all ranks evaluate the weights that
    rank 0 saves: each rank's last training forward updated its statistics on its own batch."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP over the parameters that currently require grad (rebuilt when a frozen backbone thaws)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
