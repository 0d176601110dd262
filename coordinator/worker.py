"""The TrainWorker actor: one per CPU slot or GPU, owning one rank's training state.

Two Ray concurrency groups keep control apart from training: `train` (one thread) runs the
process-group set-up and the training loop; `control` runs heartbeats and stop requests on another
thread, so the controller can always reach a worker even while it sits in a collective. The process
group belongs to a *generation*: joining generation g tears down the old group and rendezvous under
the store prefix `gen<g>/` of the driver-hosted TCPStore, so the loss of any worker (rank 0
included) never takes the rendezvous down with it.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional

import ray
import torch
import torch.distributed as dist

from train import data as data_lib
from train import parallel
from coordinator.checkpoint.saver import CheckpointSaver, SaveReport, load_checkpoint
from train.state import (
    TrainState,
    apply_loaded,
    build_state,
    checkpoint_state,
    full_model_state,
    load_template,
    weights_digest,
)
from train.step import train_step
from train.task import make_task

logger = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 2, "train": 1}


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a job is told at creation (no Ray or config objects inside)."""
    task: str
    task_args: Dict[str, Any]
    seed: int
    total_steps: int
    global_batch_size: int
    parallelism: str
    use_gpu: bool
    torch_threads: int
    collective_timeout_s: float
    checkpoint_uri: str = ""
    checkpoint_options: Dict[str, Any] = field(default_factory=dict)
    checkpoint_interval: int = 0  # 0 = no periodic saves
    checkpoint_async: bool = True
    checkpoint_final: bool = False  # save at the last step (so a longer rerun can continue)


@dataclass
class StepReport:
    step: int  # the step just completed (1-based count of completed steps)
    weighted_loss: float  # this rank's mean loss times its share of the global batch
    t: float  # unix time the step completed
    duration_s: float  # wall time of the step on this rank


@dataclass
class Heartbeat:
    rank: Optional[int]
    generation: int
    step: int  # completed steps
    reports: List[StepReport] = field(default_factory=list)  # completed steps since last poll
    saves: List[SaveReport] = field(default_factory=list)  # finished checkpoint writes since then


class WorkerError(RuntimeError):
    """A failure inside a worker that is not a lost process (bad user task, collective error)."""


@ray.remote(concurrency_groups=CONCURRENCY_GROUPS, max_restarts=0, max_task_retries=0)
class TrainWorker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        torch.set_num_threads(max(1, spec.torch_threads))
        self.task = make_task(spec.task, spec.task_args)
        self.device = self._pick_device()
        self.state: Optional[TrainState] = None
        self.generation = 0
        self.rank: Optional[int] = None
        self.world_size = 0
        self._reports: "collections.deque[StepReport]" = collections.deque()
        self.saver: Optional[CheckpointSaver] = None

    def _pick_device(self) -> torch.device:
        if not self.spec.use_gpu:
            return torch.device("cpu")
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, which torch then sees as device 0.
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)

    # ---- control group: never blocked by training ------------------------------------------
    @ray.method(concurrency_group="control")
    def info(self) -> Dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "device": str(self.device)}

    @ray.method(concurrency_group="control")
    def heartbeat(self) -> Heartbeat:
        reports, saves = [], []
        while self._reports:
            reports.append(self._reports.popleft())
        while self.saver is not None and self.saver.reports:
            saves.append(self.saver.reports.popleft())
        step = self.state.step if self.state is not None else 0
        return Heartbeat(self.rank, self.generation, step, reports, saves)

    # ---- train group ----------------------------------------------------------------------
    @ray.method(concurrency_group="train")
    def join_group(self, generation: int, rank: int, world_size: int, store_host: str,
                   store_port: int, restore_path: Optional[str] = None) -> int:
        """Leave the previous generation's process group and form generation `generation`;
        with `restore_path`, load that checkpoint (resharded to this world). Returns the step."""
        if self.saver is not None:
            self.saver.close()
            self.saver = None
        if dist.is_initialized():
            dist.destroy_process_group()
        timeout = timedelta(seconds=self.spec.collective_timeout_s)
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        backend = "nccl" if self.spec.use_gpu else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore(f"gen{generation}/", store),
                                rank=rank, world_size=world_size, timeout=timeout)
        # Checkpoint collectives get their own gloo group: they run on the persist thread and must
        # never interleave with the training group's collectives.
        ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        self.generation, self.rank, self.world_size = generation, rank, world_size
        if self.state is None:
            self.state = build_state(self.task, self.spec.parallelism, self.device,
                                     self.spec.seed, self.spec.total_steps)
        # Per-rank RNG (dropout and the like) derives from (seed, rank) only.
        torch.manual_seed(self.spec.seed * 100_003 + 1 + rank)
        if restore_path:
            st = self.state
            sd = load_checkpoint(restore_path, self.spec.checkpoint_options,
                                 lambda saved: load_template(st, rank, saved), ckpt_group)
            apply_loaded(st, sd, rank)
        # Same DDP bucket layout for every wrap, resumed or not (see train.parallel.prime).
        batch = data_lib.local_batch(self.task, self.spec.seed, self.state.step,
                                     self.spec.global_batch_size, world_size, rank)
        parallel.prime(self.state.model, self.task.loss,
                       {k: v.to(self.device) for k, v in batch.items()})
        if self.spec.checkpoint_uri:
            self.saver = CheckpointSaver(self.spec.checkpoint_uri, self.spec.checkpoint_options,
                                         self.spec.checkpoint_async, rank, ckpt_group,
                                         split_replicated=self.spec.parallelism == "ddp")
            self.saver.last_step = self.state.step if restore_path else None
        return self.state.step

    @ray.method(concurrency_group="train")
    def train(self, until_step: int) -> int:
        """Run steps until `until_step`; returns the completed step."""
        assert self.state is not None and self.rank is not None, "join_group first"
        st, spec = self.state, self.spec
        scale = data_lib.loss_scale(spec.global_batch_size, self.world_size, self.rank)
        share = data_lib.share(spec.global_batch_size, self.world_size, self.rank)
        while st.step < until_step:
            t0 = time.time()
            batch = data_lib.local_batch(self.task, spec.seed, st.step, spec.global_batch_size,
                                         self.world_size, self.rank)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            try:
                loss = train_step(st.model, st.optimizer, st.scheduler, self.task.loss, batch,
                                  scale)
            except RuntimeError as e:  # a peer died or hung: gloo/nccl raise here
                raise WorkerError(f"rank {self.rank} step {st.step + 1}: {e}") from None
            st.step += 1
            now = time.time()
            self._reports.append(StepReport(st.step, loss * share, now, now - t0))
            interval = spec.checkpoint_interval
            if self.saver is not None and interval and st.step % interval == 0 \
                    and st.step < spec.total_steps:
                self._checkpoint()
        if self.saver is not None:
            if spec.checkpoint_final and st.step == spec.total_steps \
                    and self.saver.last_step != st.step:
                self._checkpoint()
            self.saver.wait()  # every save of this call is reported before it returns
        return st.step

    def _checkpoint(self) -> None:
        t0 = time.time()  # the stall includes gathering the state dict, not only staging it
        self.saver.save(self.state.step, checkpoint_state(self.state, self.rank), started=t0)

    @ray.method(concurrency_group="train")
    def final_digest(self) -> Optional[str]:
        """sha256 of the full model state. A collective under FSDP2: call on every rank; rank 0
        returns the digest, the others None."""
        assert self.state is not None
        sd = full_model_state(self.state)
        return weights_digest(sd) if self.rank == 0 else None
