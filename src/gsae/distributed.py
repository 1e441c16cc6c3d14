"""Training across several processes started by `torchrun`, with `torch.distributed`.

Outside torchrun (no `WORLD_SIZE` in the environment) every helper here is a no-op for one
process: rank 0 of a world of 1. Under torchrun, `init` joins the process group: NCCL for CUDA
tensors and gloo for CPU tensors.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment)."""
    return "WORLD_SIZE" in os.environ


def local_device(name: str) -> str:
    """A device name for this process: under torchrun a bare `cuda` means `cuda:LOCAL_RANK`,
    so each rank of a machine gets its own GPU; anything else is kept as given."""
    if name == "cuda" and launched():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return name


def init() -> None:
    """Join the process group that torchrun set up (once; nothing outside torchrun)."""
    if not launched() or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the one that writes shared files and prints."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Replace each tensor (all on one device, any shapes) by its sum over the ranks, with one
    all-reduce of a flat buffer."""
    if world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def shard(t: Tensor, pad: bool = False) -> Tensor:
    """This rank's contiguous share of the rows of `t` (rank order is row order). With `pad`,
    every share has ceil(rows / world) rows, the last row repeated as needed (see `gather`)."""
    world = world_size()
    if pad and t.shape[0] % world:
        fill = t[-1:].expand(world - t.shape[0] % world, *t.shape[1:])
        t = torch.cat([t, fill])
    return t.tensor_split(world)[rank()]


def gather(t: Tensor, rows: int) -> Tensor:
    """The inverse of `shard(pad=True)`: every rank's share, concatenated, cut to `rows`."""
    world = world_size()
    if world == 1:
        return t[:rows]
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)[:rows]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
