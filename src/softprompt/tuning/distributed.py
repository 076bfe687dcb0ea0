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

Sharded (``--shard``, ``shard_layers``): the frozen base model's decoder layers are split across
the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), so each holds about 1/N of
their weights and gathers a layer's whole weights only while that layer runs. The decoder
stack is the root of the sharding, so its final norm is sharded with it; the embedding table
and the output head stay whole in every process: softprompt embeds token ids itself, outside
the model's forward, which a sharded root module does not allow. Data
parallelism composes as before (each process its own share of every batch); every process must
then run the same forwards, so one whose share of a batch is empty runs the batch's first row
with zero weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sharded: bool = False
    """Whether the base model's layers are sharded across the group (``shard_layers``)."""

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


def decoder_layers(model: Any) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The model's decoder blocks (the ``ModuleList`` of as many modules as the config has
    hidden layers) and the module that holds them (the decoder stack).

    Raises:
        UserError: no such list (the model's layers cannot be found to shard).
    """
    config = model.config.get_text_config()
    count = getattr(config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and count and len(module) == count
    ]
    if len(found) != 1 or "." not in found[0][0]:
        raise UserError(
            f"--shard cannot find the decoder layers of {type(model).__name__} (looked for one "
            f"list of its {count} hidden layers, found {len(found)}); train it without --shard"
        )
    name, layers = found[0]
    return model.get_submodule(name.rsplit(".", 1)[0]), layers


def check_shardable(group: Group) -> None:
    """Refuse ``--shard`` outside a distributed launch of 2 or more processes."""
    if not group.active:
        raise UserError(
            "--shard splits the base model across the processes of a distributed launch; run "
            "it under torchrun or accelerate launch with 2 or more processes"
        )


def shard_layers(model: Any, group: Group, device: torch.device) -> Group:
    """Shard ``model``'s decoder layers across ``group`` (FSDP2 on torch's process group) and
    put the rest of the model on ``device``; returns the group marked sharded.

    Load the model on the CPU first for a model that does not fit one GPU: each layer's shards
    go to ``device`` as it is sharded.

    Raises:
        UserError: not a distributed launch, or the layers cannot be found.
    """
    check_shardable(group)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        setup(device)
    stack, layers = decoder_layers(model)
    mesh = init_device_mesh(device.type, (group.world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The stack is the root, so that each layer gives its gathered weights back after its
    # forward (a root keeps its own); the embedding (and a head tied to it) stays whole: it is
    # read outside the model's forward.
    whole = {p for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m
             is not None for p in m.parameters()}  # fmt: skip
    fully_shard(stack, mesh=mesh, ignored_params=whole)
    model.to(device)  # what stays whole: the embedding, the output head
    return replace(group, sharded=True)


def reshard(model: Any) -> None:
    """Give back every gathered layer's weights (a sharded model after a forward without
    backward keeps the root's gathered); no-op for a model that is not sharded."""
    for module in model.modules():
        if callable(getattr(module, "reshard", None)) and hasattr(module, "unshard"):
            module.reshard()


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of memory the base model's weights take in this process: ``sharded`` (the storage
    behind its shards of the sharded layers) and ``whole`` (parameters every process holds in
    full). Storage, not element counts: a shard that still viewed the whole tensor would count
    the whole tensor."""
    reshard(model)
    out = {"sharded": 0, "whole": 0}
    seen: set[int] = set()
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        storage = local.untyped_storage()
        if storage.data_ptr() in seen:
            continue  # tied weights, counted once
        seen.add(storage.data_ptr())
        out["sharded" if local is not param else "whole"] += storage.nbytes()
    return out


def gather(group: Group, value: Any) -> list[Any]:
    """``value`` from every process, in rank order (``[value]`` for one process)."""
    if not group.active:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * group.world
    dist.all_gather_object(out, value)
    return out
