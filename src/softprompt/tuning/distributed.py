"""Data-parallel training over torch.distributed, for runs launched by torchrun or accelerate.

Launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address) in each
process's environment; with more than one process, ``setup`` joins the group: gloo on the CPU,
NCCL on GPUs (each process on the GPU of its local rank). Every process reads the same data and
draws the same batches of ``--batch-size`` x processes rows; each takes its own share of every
batch, and the prompt rows' gradients are summed over processes with the loss divided by the
batch's total scored tokens, so a step equals the one-process step on the whole batch (up to
the order of float sums). Only rank 0 writes (checkpoints, the adapter) and prints.

The prompt is one small tensor, so its gradient is all-reduced by hand after ``backward``:
``DistributedDataParallel`` wraps modules and buckets many parameters, neither of which applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes and prints (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Group()


def launched() -> Group:
    """The process group a launcher set up in the environment (``SINGLE`` when none)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return Group(
        rank=int(os.environ.get("RANK", "0")),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(device: torch.device) -> Group:
    """Join the launcher's group (no-op for one process); gloo on the CPU, NCCL on GPUs.

    A process that waits longer than ``SOFTPROMPT_DIST_TIMEOUT`` seconds (default 300) for the
    others fails instead of hanging.
    """
    group = launched()
    if not group.active:
        return group
    import torch.distributed as dist

    if dist.is_initialized():
        return group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise UserError("this PyTorch has no NCCL: run data parallel on GPUs with a CUDA build")
    timeout = timedelta(seconds=float(os.environ.get("SOFTPROMPT_DIST_TIMEOUT", "300")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return group


def device_for(group: Group, device: torch.device) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes the GPU of its local rank."""
    if group.active and device.type == "cuda" and device.index is None:
        return torch.device(device.type, group.local_rank)
    return device


class PeerLost(RuntimeError):
    """Another process of the group stopped (or cannot be reached) in the middle of the run."""


def sum_(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process, in place (unchanged for one process).

    Raises:
        PeerLost: a process of the group is gone (its connection closed, or the wait for it
            timed out).
    """
    if group.active:
        import torch.distributed as dist

        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except RuntimeError as exc:  # gloo and NCCL report a lost peer as RuntimeError kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PeerLost(first) from exc
    return tensor


def barrier(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(group: Group) -> None:
    if group.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
