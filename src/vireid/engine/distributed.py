"""Distributed data parallel set-up from ``torchrun`` environment variables (torchvision style).

``torchrun --nproc_per_node=N -m vireid train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them training runs in one process. On CUDA every process first makes
``cuda:LOCAL_RANK`` its current device, then joins an NCCL process group bound to that device
(``init_process_group(device_id=...)``); on the CPU the backend is gloo. Every collective of the
engine goes through this module and takes tensors on the training device (NCCL accepts only
CUDA tensors): log reductions, the finiteness flag, the adversary's gradients, broadcast objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from vireid.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Make ``device`` the current CUDA device, then join the process group (``env://``) when
    launched by torchrun with more than one process."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not info.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group(backend="nccl", init_method="env://", rank=info.rank, world_size=info.world_size,
                                device_id=device)
    else:
        dist.init_process_group(backend="gloo", init_method="env://", rank=info.rank, world_size=info.world_size)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: Tensor, info: DistInfo) -> Tensor:
    """Element-wise sum over ranks of a tensor on the training device (itself in one process)."""
    if info.enabled:
        dist.all_reduce(values)
    return values


def all_ranks_succeeded(ok: bool, info: DistInfo, device: torch.device) -> bool:
    """True when ``ok`` is true on every rank (so that one rank's failure stops all of them)."""
    if not info.enabled:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() == 0.0)


def average_gradients(params: Sequence[Tensor], info: DistInfo) -> None:
    """Average the gradients of ``params`` over ranks in one flat all-reduce (parameters that DDP
    does not manage, such as a min-max method's adversary)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_object(obj: T, info: DistInfo, device: torch.device) -> T:
    """Rank 0's ``obj`` on every rank (pickled through a tensor on ``device``)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def local_leader_first(fn: Callable[[bool], T], info: DistInfo, device: torch.device) -> T:
    """``fn(leader)`` on local rank 0 of every machine first (``leader`` true: it may download),
    then on the other processes (which find what it fetched). An :class:`InputError` on any rank
    is raised on every rank, so no process is left waiting for one that failed."""
    result: T | None = None
    error: InputError | None = None
    for leader_turn in (True, False):
        if (info.local_rank == 0) == leader_turn:
            try:
                result = fn(leader_turn)
            except InputError as exc:
                error = exc
        if not all_ranks_succeeded(error is None, info, device):
            if error is not None:
                raise error
            raise InputError("another process failed (see its error above)")
    return result  # type: ignore[return-value]
