"""Wrap a model for data parallelism over the current default process group."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.utils import _verify_param_shape_across_processes
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
        return _ddp(model, device)
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


def _ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP without its two costs that grow with the model, for a wrap that happens at every
    change of membership:

    - No broadcast of rank 0's weights (`init_sync=False`): every caller wraps replicas that are
      equal already (built from the same seed, loaded from one checkpoint, or taken from a peer
      with a verified checksum). Their shapes are still compared across the ranks (one small
      all-gather), so a task that builds different models on different ranks fails here.
    - Gradients are views into DDP's buckets (`gradient_as_bucket_view`): one copy of the
      gradients per rank, not two.

    And the bucket layout is set at once, the same at every wrap (see `_fixed_buckets`)."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids, init_sync=False,
                                  gradient_as_bucket_view=True)
    params = [p for p in model.parameters() if p.requires_grad]
    _verify_param_shape_across_processes(ddp.process_group, params)
    _fixed_buckets(ddp)
    return ddp


def _fixed_buckets(ddp: DistributedDataParallel) -> None:
    """Give DDP its final gradient buckets now, without a forward and backward pass.

    DDP reorders its buckets after the first backward of a wrapped model (into the order the
    gradients became ready), and gloo's all-reduce sums each element in an order that depends on
    where it sits in its bucket: a rewrap (a resume, a new generation) whose first step ran on
    another layout than the uninterrupted run's would drift in the last bits. Instead every wrap
    takes one fixed layout: the parameters in reverse registration order (about the order a
    backward pass produces their gradients, so the first buckets are reduced while the backward
    goes on), the small first bucket last. This is DDP's own rebuild (the one its `join` uses),
    fed every parameter at once; it agrees the layout across the ranks with one small broadcast,
    and after it DDP never rebuilds again. It used to take a primed forward and backward, with
    a full all-reduce of zero gradients: as long as a training step at 100M parameters."""
    previous = os.environ.get(_LAST_BUCKET_SMALL)
    os.environ[_LAST_BUCKET_SMALL] = "1"  # read by the rebuild: reverse the order given
    try:
        ddp.reducer._push_all_rebuilt_params()
        ddp.reducer._rebuild_buckets()
    finally:
        if previous is None:
            os.environ.pop(_LAST_BUCKET_SMALL, None)
        else:
            os.environ[_LAST_BUCKET_SMALL] = previous


_LAST_BUCKET_SMALL = "DDP_SET_LAST_BUCKET_CAP"


def replica_groups(world: int, shard_group_size: Optional[int]) -> int:
    """How many HSDP replica groups a world of `world` ranks forms."""
    if not shard_group_size or shard_group_size < 1 or world % shard_group_size:
        raise ValueError(f"train.shard_group_size={shard_group_size!r}: an HSDP world of {world} "
                         "ranks must be a whole number of shard groups")
    return world // shard_group_size


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
