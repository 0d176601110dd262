"""Wrap a model for data parallelism over the current default process group."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train.task import Task


SHARDED = ("fsdp", "hsdp")  # the parallelisms whose ranks hold shards, not replicas


def wrap(model: nn.Module, parallelism: str, device: torch.device, task: Task,
         precision: str = "fp32", mesh_name: str = "dp",
         shard_group_size: Optional[int] = None) -> nn.Module:
    """DDP: a replica per rank, gradients averaged. FSDP2 (`fully_shard`): parameters, gradients
    and optimizer state sharded over the ranks; `task.fsdp_units` are sharded one by one so their
    all-gathers overlap compute, then the root. `precision="bf16"` under FSDP2: parameters are
    gathered and computed in bfloat16, gradients reduced in fp32, the sharded master weights
    stay fp32 (DDP's bf16 is autocast in the step).

    `mesh_name`: the FSDP2 mesh's dimension name. A process that re-forms its group (a new
    generation) must give each mesh its own name: DTensor caches sharding decisions by mesh, and
    two meshes of the same size and rank list compare equal, so a cached decision would hand new
    tensors the *old* mesh, with this process's old coordinate in it (seen: after a world of 4
    shrank to 3 and grew back to 4, each renumbered rank placed its rows where its old rank's
    went, and DCP found a quarter of every tensor missing at the next save).

    HSDP (`parallelism="hsdp"`): FSDP2 over a 2-D mesh, replicate x shard. Ranks
    [k*S, (k+1)*S) form replica group k (S = `shard_group_size`, consecutive ranks: the same node
    where the placement allows) and shard the model among themselves; the groups hold the same
    shards, and average their gradients across (`Replicate()` x `Shard(0)` DTensors)."""
    if parallelism == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallelism in SHARDED:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        world = dist.get_world_size()
        if parallelism == "fsdp":
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=(mesh_name,))
        else:
            size = replica_groups(world, shard_group_size)
            mesh = init_device_mesh(device.type, (size, world // size),
                                    mesh_dim_names=(f"{mesh_name}_replicate",
                                                    f"{mesh_name}_shard"))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for unit in task.fsdp_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ValueError(f"train.parallelism={parallelism!r}: must be ddp, fsdp or hsdp")


def replica_groups(world: int, shard_group_size: Optional[int]) -> int:
    """How many HSDP replica groups a world of `world` ranks forms."""
    if not shard_group_size or shard_group_size < 1 or world % shard_group_size:
        raise ValueError(f"train.shard_group_size={shard_group_size!r}: an HSDP world of {world} "
                         "ranks must be a whole number of shard groups")
    return world // shard_group_size


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def prime(model: nn.Module, loss_fn, batch) -> None:
    """Run one forward/backward with a zero loss so DDP rebuilds its gradient buckets now.

    DDP reorders its buckets after the first backward of a wrapped model, and gloo's all-reduce
    sums each element in an order that depends on where it sits in its bucket. Without this, the
    first step after any (re)wrap, such as a resume, would sum in another order than the
    uninterrupted run did at that step, and the weights would drift in the last bits. Priming
    gives every wrap the same bucket layout before the first real step. FSDP2 has no buckets to
    rebuild; it is left alone. The zero gradients are discarded. `batch`: one forward pass's
    worth (`train.data.first_pass`: never more than a micro-batch)."""
    if not isinstance(model, DistributedDataParallel):
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # dropout here must not shift the RNG stream
        (loss_fn(model, batch) * 0.0).backward()
    for p in model.parameters():
        p.grad = None
