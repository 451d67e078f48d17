"""Several processes under torchrun: NCCL on GPUs, gloo on CPUs, rank 0 writes everything.

    torchrun --nproc_per_node=8 train.py --config configs/preactresnet18.yaml

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op.
Two environment variables set the waits (seconds): PREACTRESNET_DIST_TIMEOUT, any collective (torch's
default: 10 min with NCCL, 30 with gloo); PREACTRESNET_DATA_TIMEOUT, the wait for each node's first
process to build the data cache (2 h by default: a first run may decode a large dataset).
PREACTRESNET_CUDA_BACKEND=gloo runs several ranks on one GPU (a test of DDP on a one-GPU machine).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_ENV, DATA_TIMEOUT_ENV = "PREACTRESNET_DIST_TIMEOUT", "PREACTRESNET_DATA_TIMEOUT"
CUDA_BACKEND_ENV = "PREACTRESNET_CUDA_BACKEND"  # nccl (default) or gloo: the process group's backend for CUDA tensors


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: object = field(default=None, compare=False, repr=False)  # gloo: host-side values (CPU tensors)
    data_group: object = field(default=None, compare=False, repr=False)  # gloo, the long wait for the data

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _seconds(env: str, default: float | None) -> timedelta | None:
    value = os.environ.get(env)
    return timedelta(seconds=float(value)) if value else (None if default is None else timedelta(seconds=default))


def backend_for(use_cuda: bool) -> str:
    """gloo on CPUs; on GPUs NCCL for CUDA tensors and gloo for CPU ones (a config, a stop flag). Ranks that
    share a GPU (more processes on this node than the GPUs they all see, or PREACTRESNET_CUDA_BACKEND=gloo)
    use gloo for CUDA tensors too: NCCL refuses two ranks on one device."""
    if not use_cuda:
        return "gloo"
    shared = "CUDA_VISIBLE_DEVICES" not in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
    cuda = os.environ.get(CUDA_BACKEND_ENV) or ("gloo" if shared else "nccl")
    return f"cpu:gloo,cuda:{cuda}"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group (the device itself is chosen and made current by system.resolve_device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(use_cuda), timeout=_seconds(TIMEOUT_ENV, None))
    host = dist.new_group(backend="gloo", timeout=_seconds(TIMEOUT_ENV, None)) if use_cuda else dist.group.WORLD
    # a group's timeout binds every rank's side of a barrier (monitored_barrier's only rank 0's): its own group
    data = dist.new_group(backend="gloo", timeout=_seconds(DATA_TIMEOUT_ENV, 7200.0))
    return DistInfo(rank, world, local, host, data)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def sum_over_ranks(all_reduce, *values: torch.Tensor) -> list[float]:
    """The values (scalar tensors on the device) summed over the ranks in one all-reduce, read once (all_reduce=None:
    this process alone)."""
    summed = torch.stack([v.float() for v in values])
    if all_reduce is not None:
        all_reduce(summed)
    return summed.tolist()


def all_reduce_max(values: list[float], info: DistInfo) -> list[float]:
    """The largest of each value over all ranks (host floats, through the gloo group)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.host_group)
    return t.tolist()


def broadcast_buffers(*modules: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place."""
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


class Agreement:
    """A flag (a stop) agreed over all ranks about every `every` seconds, however long a step takes.

    Ranks meet at the same call counts: the next meeting is set from the slowest rank's time per call at
    the last one, so it is the same number on every rank. Host values through gloo: no GPU synchronization.
    """

    def __init__(self, info: DistInfo, every: float = 1.0):
        self.info, self.every = info, every
        self.calls, self.due, self.since, self.at = 0, 1, time.monotonic(), 0

    def poll(self, flag: bool) -> bool:
        """Call once per step on every rank: whether any rank's flag was set (decided at meetings only)."""
        if not self.info.enabled:
            return flag
        self.calls += 1
        return self.meet(flag) if self.calls >= self.due else False

    def meet(self, flag: bool) -> bool:
        """Compare the flags now (every rank must call this at the same point): for long steps such as an
        evaluation's batches, where a meeting per call costs nothing."""
        if not self.info.enabled:
            return flag
        now = time.monotonic()
        anyone, per_call = all_reduce_max([float(flag), (now - self.since) / max(self.calls - self.at, 1)], self.info)
        self.due = self.calls + max(1, int(self.every / max(per_call, 1e-6)))
        self.since, self.at = now, self.calls
        return anyone > 0


def wait_for_data(info: DistInfo) -> None:
    """Every rank waits here while each node's first process builds the data (a long wait, not a hang)."""
    if info.enabled:
        dist.barrier(group=info.data_group)


def gather_objects(value, info: DistInfo) -> list | None:
    """Every rank's `value` as a list on rank 0 (None elsewhere); [value] without torchrun."""
    if not info.enabled:
        return [value]
    box = [None] * info.world_size if info.is_main else None
    dist.gather_object(value, box, dst=0, group=info.host_group)
    return box


def broadcast_object(value, info: DistInfo):
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=info.host_group)
    return box[0]


def is_launched() -> bool:
    """Whether this process joined a process group (torchrun's)."""
    return dist.is_available() and dist.is_initialized()


def cleanup() -> None:
    if is_launched():
        dist.destroy_process_group()
