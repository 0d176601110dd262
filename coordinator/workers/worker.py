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
import contextlib
import gc
import logging
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Dict, Optional, Tuple

import ray
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from coordinator.checkpoint.errors import OTHER, classify
from coordinator.checkpoint.faults import StorageOutage
from coordinator.checkpoint.fence import GenerationFence
from coordinator.checkpoint.saver import CheckpointSaver, load_checkpoint, make_stager
from coordinator.procmem import hog_memory, peak_rss_bytes
from coordinator.protocol import Heartbeat, SaveReport, Source, StepReport, StopMode, TrainResult
from coordinator.workers import peer_transfer
from coordinator.workers.peer_transfer import StateTransferMismatch, broadcast_full, flip_bit
from coordinator.workers.release import GroupSockets
from coordinator.workers.shard_memory import MemoryRestoreError, ShardMemory
from coordinator.workers.spec import WorkerSpec
from coordinator.workers.vote import StopVote
from train import parallel
from train.errors import short_error
from train.loop import StepError, run_steps
from train.evaluate import eval_loss
from train.state import (
    FullState,
    TrainState,
    apply_full_state,
    apply_loaded,
    build_state,
    checkpoint_state,
    full_model_state,
    full_state,
    load_template,
    weights_digest,
)
from train.task import make_task

logger = logging.getLogger(__name__)

CONCURRENCY_GROUPS = {"control": 2, "train": 1}


def _lr(optimizer) -> Optional[float]:
    groups = optimizer.param_groups
    lr = groups[0].get("lr") if groups else None
    return float(lr) if isinstance(lr, (int, float)) or torch.is_tensor(lr) else None


def _abort_nccl() -> None:
    """NCCL's own release: abort the default group's communicators, which makes a kernel
    blocked on a lost peer return with an error (gloo is released through its sockets)."""
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cuda"))
        backend.abort()
    except Exception as e:  # already destroyed, or a torch without it: the sockets remain
        logger.warning("aborting the NCCL group: %s", short_error(e))


class WorkerError(RuntimeError):
    """A failure inside a worker that is not a lost process (bad user task, collective error)."""


class RestoreError(WorkerError):
    """Storage failed while this worker restored a checkpoint (a read error, a shard gone): not
    the user's code; the driver retries or restores an older checkpoint."""


class _ChaosTask:
    """The user's task with its loss routed through the worker (the `nonfinite` chaos action);
    everything else is the task's own."""

    def __init__(self, task, loss):
        self._task, self.loss = task, loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


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
        self._save_reports: "collections.deque[SaveReport]" = collections.deque()
        self.saver: Optional[CheckpointSaver] = None
        # the savers' staging buffers, one set for the worker's life: every generation's saver
        # copies into them, so a recovery never allocates a second copy of the state
        self._stager = None
        self._ctl_group = None  # gloo group for stop agreement and peer state (None: default)
        self._stop = StopMode.NONE
        self._save_request = 0  # the highest checkpoint request heard from the controller
        self._saved_request = 0  # the highest request acted on in this generation
        self._broken = False  # the current group failed: nothing more may run on it
        self._joined = False  # a generation formed with it: its RNG stream is its own from then
        self._kill_in_checkpoint = False  # chaos: SIGKILL itself while its next save is written
        self._corrupt_transfer = False  # chaos: flip a bit of the next state it sends a peer
        self._outage: Optional[StorageOutage] = None  # chaos: made by the first storage_outage
        self._poison = False  # chaos: this rank's next loss is made NaN
        self._peer_bytes = 0  # bytes taken from peers by the last join (DDP)
        # the long phase the train thread is in (see _phase), said in every heartbeat
        self._busy: Optional[str] = None
        self._fence: Optional[GenerationFence] = None  # this generation's (see checkpoint/fence)
        self._sockets = GroupSockets()  # this generation's group connections (see release)
        self._memory = ShardMemory(spec.memory_interval,  # FSDP2/HSDP shards in memory
                                   spec.shard_group_size)
        # Every object so far (torch, the task's modules: hundreds of thousands) is kept for the
        # process's life: the collections a teardown runs (to close a failed group's sockets)
        # then scan only what came since, ~15 ms instead of ~200 ms on the recovery's path.
        gc.freeze()

    @contextlib.contextmanager
    def _phase(self, name: str):
        """A phase that may take long at a large model size (a model build, a join with its
        state transfer or restore, a checkpoint written before training goes on, the final
        digest): heartbeats say so, and the driver allows `failure.busy_hang_timeout_s` of
        silence in it before calling the worker hung (they answer through it; the slack is
        for a machine that starves the process)."""
        outer, self._busy = self._busy, name
        try:
            yield
        finally:
            self._busy = outer

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
        while self._save_reports:
            saves.append(self._save_reports.popleft())
        step = self.state.step if self.state is not None else 0
        gen, held, world = self._memory.store.held()
        return Heartbeat(self.rank, self.generation, step, reports, saves,
                         memory_generation=gen, memory=held, memory_world=world,
                         memory_bytes=self._memory.store.peak_bytes, busy=self._busy,
                         peak_rss_bytes=peak_rss_bytes())

    @ray.method(concurrency_group="control")
    def snapshot_pieces(self, generation: int, owner: int, step: int,
                        wanted: Dict[str, Tuple[int, int]], shared: bool,
                        rng_of: Optional[str]) -> Dict[str, Any]:
        """The rows a member of the next generation needs from rank `owner`'s snapshot at
        `step` (see snapshots.pieces). Raises SnapshotError if it is not held here."""
        return self._memory.pieces(generation, owner, step, wanted, shared, rng_of)

    @ray.method(concurrency_group="control")
    def release(self, generation: int) -> int:
        """Release this worker from generation `generation`'s failed process group in place:
        shut its group connections down, so a collective blocked on a lost or frozen peer (or on
        a survivor waiting for one) fails now and the train call returns; the process, its
        imported modules and its memory stay. Nothing happens if the worker is in another
        generation by now. Returns how many connections were shut down."""
        if self.spec.use_gpu and self.generation == generation and dist.is_initialized():
            _abort_nccl()
        return self._sockets.release(generation)

    @ray.method(concurrency_group="control")
    def request_stop(self, mode: int) -> None:
        """Ask the training loop to stop after the current step (StopMode.PAUSE), or to take a
        checkpoint and stop (StopMode.CHECKPOINT). All ranks agree on the step (see train)."""
        self._stop = max(self._stop, mode)

    @ray.method(concurrency_group="control")
    def request_checkpoint(self, number: int) -> None:
        """Ask for a checkpoint after the current step (numbered requests; see the vote)."""
        self._save_request = max(self._save_request, number)

    @ray.method(concurrency_group="control")
    def chaos(self, action: str, arg: Optional[float] = None) -> None:
        """Fault injection, run on the worker's own node so it works on any cluster."""
        if action == "kill_worker":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "hang_worker":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "kill_during_checkpoint":
            self._kill_in_checkpoint = True
        elif action == "nonfinite":
            self._poison = True  # read by the loss of the next step (see _poisoned_loss)
        elif action == "corrupt_transfer":
            self._corrupt_transfer = True
        elif action == "hog_memory":
            hog_memory(float(arg or 20.0))
        elif action == "storage_outage":
            # The fault point reaches the saves from here on: the current saver's next file and
            # every later saver's (see _wrap). Runs without chaos never get one.
            if self._outage is None:
                self._outage = StorageOutage()
            self._outage.start(float(arg or 10.0))
            saver = self.saver
            if saver is not None:
                saver.set_fault(self._fault_point())
        else:
            raise ValueError(f"unknown chaos action {action!r}")

    # ---- train group ----------------------------------------------------------------------
    @ray.method(concurrency_group="train")
    def warm(self) -> None:
        """Build the DDP state (model, optimizer) while the worker waits for a rank: asked for
        at spawn, so a spare or a replacement joins with its state in place and the recovery
        does not wait for it. On the train thread: a join queues behind it (a slow build delays
        the join, not the worker's start). An FSDP2 state is built on its generation's mesh, at
        the join. A build error is left for the join to raise (where it fails the job)."""
        if self.spec.parallelism == "ddp" and self.state is None:
            try:
                with self._phase("building its model"):
                    self.state = self._build()
            except Exception:
                self.state = None

    @ray.method(concurrency_group="train")
    def join_group(self, generation: int, rank: int, world_size: int, store_host: str,
                   store_port: int, source: Optional[Source] = None,
                   buddies: Optional[Dict[int, int]] = None) -> Dict[str, Any]:
        """Leave the previous generation's process group (if any) and form generation
        `generation` as `rank` of `world_size`; take the training state from `source`. A survivor
        keeps its model and optimizer objects (DDP) and only rewraps them. `buddies`: rank -> the
        rank holding copies of its in-memory snapshots in this generation. Returns the step and
        the seconds spent taking the state from `source` (the rest of the join is re-forming)."""
        source = source or Source()
        with self._phase(f"joining generation {generation}"):
            return self._join(generation, rank, world_size, store_host, store_port, source,
                              buddies)

    def _join(self, generation: int, rank: int, world_size: int, store_host: str,
              store_port: int, source: Source, buddies: Optional[Dict[int, int]]
              ) -> Dict[str, Any]:
        try:
            t = [time.monotonic()]
            held = self._leave(source)
            t.append(time.monotonic())
            ckpt_group = self._rendezvous(generation, rank, world_size, store_host, store_port)
            t.append(time.monotonic())
            build_s, restore_s = self._restore(source, held, ckpt_group)
            del held
            t.append(time.monotonic())
            self._wrap(source, ckpt_group)
            t.append(time.monotonic())
            self._joined = True
            self._memory.start_link(generation, rank, buddies)
            # Where the join's time went (the recovery profile: see control/recovery_profile).
            parts = {"leave_s": t[1] - t[0], "rendezvous_s": t[2] - t[1], "build_s": build_s,
                     "transfer_s": restore_s, "wrap_s": t[4] - t[3]}
            moved = self._memory.take_transfer_bytes() + self._peer_bytes
            self._peer_bytes = 0
            return {"step": self.state.step, "restore_s": restore_s, "parts": parts,
                    "transfer_bytes": moved}
        except StateTransferMismatch as e:
            # Every member raises it after the same vote, so none is left in a collective; the
            # controller takes the state from another source (it reads the fields, not the text).
            self._broken = True
            traceback.clear_frames(e.__traceback__)
            error, fatal = "", e
        except RuntimeError as e:  # a peer was lost while forming: gloo/store errors
            self._broken = True
            kind = type(e) if isinstance(e, WorkerError) else WorkerError
            error = str(e) if isinstance(e, WorkerError) else (
                f"rank {rank} joining generation {generation}: {short_error(e)}")
            fatal = None
        except Exception as e:  # the task's own code (build_model, a model unlike its peers')
            # The job fails with it, but the group is left first, so peers blocked in a
            # collective with this rank are released now, not after the collective timeout.
            # The traceback's frames let go of their locals (the groups among them); its text
            # stays for the error message.
            self._broken = True
            traceback.clear_frames(e.__traceback__)
            fatal = e
        self._teardown()
        if fatal is not None:
            raise fatal
        raise kind(error)

    def _leave(self, source: Source) -> Optional[FullState]:
        """Leave the current group. Under FSDP2 a survivor first gathers the full state over it
        (all its members are alive) when `source` asks for it: the new group is restored from
        that. Returns the gathered state (None otherwise)."""
        held = None
        if source.gather and self.state is not None and not self._broken:
            held = full_state(self.state, sharded=True)
        self._teardown()
        self._stop = StopMode.NONE
        self._saved_request = 0
        return held

    def _rendezvous(self, generation: int, rank: int, world_size: int, store_host: str,
                    store_port: int):
        """Form generation `generation`'s process group through the driver's store, with its side
        groups. Returns the checkpoint group."""
        timeout = timedelta(seconds=self.spec.collective_timeout_s)
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
        prefix = f"gen{generation}/"
        self._arrive(store, prefix, world_size)
        backend = "nccl" if self.spec.use_gpu else "gloo"
        # Every connection the groups open is recorded, so a failure can release this worker in
        # place (see release).
        self._sockets.begin(generation, store_port)
        with self._sockets.track():
            dist.init_process_group(backend, store=dist.PrefixStore(prefix, store),
                                    rank=rank, world_size=world_size, timeout=timeout)
            # Checkpoint collectives get their own gloo group: they run on the persist thread
            # and must never interleave with the training group's collectives.
            ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
            self._ctl_group = dist.new_group(backend="gloo", timeout=timeout) \
                if backend != "gloo" else None
            self._memory.open_group(generation, store_port, timeout)  # the buddies' copies
        self._broken = False
        self.generation, self.rank, self.world_size = generation, rank, world_size
        self._fence = GenerationFence(store_host, store_port, generation)
        return ckpt_group

    def _restore(self, source: Source, held: Optional[FullState],
                 ckpt_group) -> Tuple[float, float]:
        """Build the state if this worker has none, then take it from `source`: as built (init),
        from a checkpoint, or broadcast by a peer. Returns the seconds the building took and
        those the taking took (0 for init)."""
        rank, ddp = self.rank, self.spec.parallelism == "ddp"
        fresh = self.state is None
        t_build = time.monotonic()
        if fresh:
            with self._sockets.track():  # an FSDP2 mesh may open groups of its own
                self.state = self._build()
        st = self.state
        t_restore = time.monotonic()
        build_s = t_restore - t_build
        if source.kind == "checkpoint":
            try:
                sd = load_checkpoint(source.path, self.spec.checkpoint_options,
                                     lambda saved: load_template(st, rank, saved), ckpt_group)
            except (Exception, CheckpointException) as e:  # (the latter is a BaseException)
                self._restore_failed(source.path, e)
            apply_loaded(st, sd, rank)
        elif source.kind == "memory":
            # A gap or a silent holder: the generation does not form (every member fails
            # alike) and the controller restores the checkpoint instead.
            try:
                self._memory.restore(source, st, rank, self.spec.collective_timeout_s)
            except MemoryRestoreError as e:
                raise WorkerError(str(e)) from None
        elif source.kind == "peer":
            tamper = None
            if rank == source.src and self._corrupt_transfer:
                tamper, self._corrupt_transfer = flip_bit, False
            if ddp:
                self._peer_bytes = self._take_replica(source, tamper)
            else:
                # FSDP2 grows from the state its members gathered (rank 0 holds it): every
                # member builds its shard of it on the new mesh. A mismatch raises on every
                # member before any applied it.
                full = broadcast_full(held, source.src, self._ctl_group, tamper=tamper)
                apply_full_state(st, full)
                del full, held
        restore_s = time.monotonic() - t_restore if source.kind != "init" else 0.0
        restored_rng = source.kind == "checkpoint" or (
            source.kind == "memory" and self._memory.rng_restored)
        if (fresh or not self._joined) and not restored_rng:
            # Per-rank RNG (dropout and the like): a newcomer seeds from (seed, rank, step), also
            # when its first join failed (its state was built then, never trained), and so does
            # a rebuilt state (FSDP2); a survivor keeps its stream; a checkpoint restores the
            # saved one, and so do in-memory snapshots for a rank the old world had.
            torch.manual_seed(self.spec.seed * 100_003 + 1 + rank + 7_919 * st.step)
        return build_s, restore_s

    def _take_replica(self, source: Source, tamper) -> int:
        """DDP: the members whose replica is not at the source step take it from those whose is
        (peer_transfer); a holder receives nothing. A receiver whose transfer did not complete
        (a mismatch, a peer lost) drops its half-written state, so it never passes for a
        replica: the next join builds it afresh. Returns the bytes this member received."""
        holders = list(source.senders or [source.src])
        try:
            stats = peer_transfer.transfer(self.state, holders, self._ctl_group, tamper=tamper)
        except BaseException:
            if self.rank not in holders:
                self.state = None
            raise
        return stats.received_bytes

    def _build(self) -> TrainState:
        """A state as at step 0 (DDP stays unwrapped until its state is final: a peer's or a
        checkpoint's state is taken into the bare module, then wrapped)."""
        return build_state(self.task, self.spec.parallelism, self.device, self.spec.seed,
                           self.spec.total_steps, wrap_ddp=False, recipe=self.spec.recipe(),
                           mesh_name=f"dp_gen{self.generation}",
                           shard_group_size=self.spec.shard_group_size)

    def _restore_failed(self, path: str, e: BaseException) -> None:
        """A checkpoint load failed. The state may be half loaded: a DDP worker rebuilds it as
        at step 0 (so it never passes for a survivor's replica), an FSDP2 one drops it. A gloo
        error outside DCP is a lost peer (WorkerError); anything else is storage (RestoreError,
        with the cause in words)."""
        cause = classify(e, path)
        if self.spec.parallelism == "ddp":
            self.state = self._build()
        else:
            self.state = None
        message = f"rank {self.rank} restoring {path}: {cause.words}"
        if isinstance(e, RuntimeError) and not isinstance(e, CheckpointException) \
                and cause.kind == OTHER:
            raise WorkerError(message) from None
        raise RestoreError(message) from None

    def _wrap(self, source: Source, ckpt_group) -> None:
        """Wrap the restored model for training (DDP) and open this generation's
        saver."""
        st, rank, ddp = self.state, self.rank, self.spec.parallelism == "ddp"
        if ddp:
            st.model = parallel.wrap(st.model, "ddp", self.device, self.task)
        if self.spec.checkpoint_uri:
            timeout = timedelta(seconds=self.spec.collective_timeout_s)
            if self._stager is None:
                self._stager = make_stager()
            self.saver = CheckpointSaver(
                self.spec.checkpoint_uri, self.spec.checkpoint_options,
                self.spec.checkpoint_async, rank, ckpt_group, split_replicated=ddp,
                generation=self.generation, reports=self._save_reports,
                fault=self._fault_point(),
                persist_timeout_s=self.spec.checkpoint_persist_timeout_s,
                hash_name=self.spec.checkpoint_hash, stager=self._stager,
                agree_group=self._ctl_group,
                new_group=lambda: self._tracked_group(timeout))
            # A restored step is on storage already: the final save does not repeat it.
            self.saver.last_step = st.step if source.kind == "checkpoint" else None

    def _tracked_group(self, timeout: timedelta):
        """A gloo side group of this generation (the saver's), released with the others."""
        with self._sockets.track():
            return dist.new_group(backend="gloo", timeout=timeout)

    def _fault_point(self):
        """What every checkpoint write checks first: the generation fence, then (chaos only) an
        injected storage outage."""
        fence, outage = self._fence, self._outage

        def check() -> None:
            if fence is not None:
                fence.check()
            if outage is not None:
                outage.check()
        return check

    def _arrive(self, store, prefix: str, world_size: int) -> None:
        """Wait until every member of the generation has arrived, or the controller aborts the
        generation (a member died while joining) by setting `<prefix>abort`. Without this, peers
        of a member lost here would wait in the rendezvous for the whole collective timeout."""
        store.add(prefix + "arrived", 1)
        deadline = time.monotonic() + self.spec.collective_timeout_s
        while store.add(prefix + "arrived", 0) < world_size:
            if store.check([prefix + "abort"]):
                raise WorkerError(f"generation {prefix.strip('/')} aborted by the controller")
            if time.monotonic() > deadline:
                raise WorkerError(f"{prefix.strip('/')}: peers did not arrive within "
                                  f"train.collective_timeout_s={self.spec.collective_timeout_s:g}")
            time.sleep(0.01)

    def _teardown(self) -> None:
        """Leave the current process group. After a failure the group is broken: the save in
        flight is abandoned, and every reference to the group is dropped before it is destroyed,
        so its sockets close and peers still blocked in a collective with us fail at once
        (gloo only notices a lost peer through a closed connection). A second call (a join after
        a failed train call) has nothing left to release and returns at once."""
        self._memory.close(self.generation)
        if self.saver is None and not dist.is_initialized() and (
                self.state is None or self.spec.parallelism == "ddp"):
            self._ctl_group = None
            return
        if self.saver is not None:
            if self._broken:
                if self.saver.in_flight:  # its thread may still read the buffers: not reused
                    self._stager = None
                self.saver.abandon()
            else:
                self.saver.close()  # a clean pause: the save in flight completes and reports
            self.saver = None
        if self.state is not None:
            if self.spec.parallelism == "ddp":
                # the gradients are views into this wrapper's buckets (and garbage between
                # steps): dropped, so the buckets go with the wrapper before the next one's
                self.state.optimizer.zero_grad(set_to_none=True)
                self.state.model = parallel.unwrap(self.state.model)
            else:
                # FSDP2's shards belong to the old mesh: the model is rebuilt on the new one and
                # its state comes from the held full state or a checkpoint.
                self.state = None
        self._ctl_group = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()

    def _poisoned_loss(self, model, batch):
        """The task's loss, made NaN once after a `nonfinite` chaos action: a real NaN that goes
        through the real backward and gradient all-reduce, as a bad batch's would."""
        loss = self.task.loss(model, batch)
        if self._poison:
            self._poison = False
            loss = loss * float("nan")
        return loss

    @ray.method(concurrency_group="train")
    def train(self, until_step: int, skip: Tuple[int, ...] = ()) -> TrainResult:
        """Run steps until `until_step`, or until a stop request all ranks agree on. `skip`:
        steps skipped before (non-finite), skipped again. A step found non-finite now is skipped
        on every rank alike (see train.step); failure.nonfinite says when that stops the call:
        stop at the first, rollback after failure.nonfinite_limit in a row, skip never. Every
        rank sees the same verdict at the same step, so they all stop at the same one."""
        assert self.state is not None and self.rank is not None, "join_group first"
        st, spec = self.state, self.spec
        st.task = _ChaosTask(self.task, self._poisoned_loss)
        vote = StopVote(self._ctl_group)
        error: Optional[str] = None
        known, skipped = frozenset(skip), set(skip)
        limit = {"stop": 1, "rollback": spec.nonfinite_limit}.get(spec.nonfinite)
        streak, poisoned = 0, False
        lr = _lr(st.optimizer)  # the rate the next step uses

        def after_step(step: int, weighted_loss: float, t: float, duration: float) -> bool:
            nonlocal error, streak, poisoned, lr
            live = step in skipped and step not in known
            # the rate this step used: the scheduler has stepped past it already
            lr_used, lr = lr, _lr(st.optimizer)
            if self._memory.due(step) and error is None:
                self._memory.snapshot(st, self.rank, step, self.world_size, self.generation)
            report = StepReport(step, weighted_loss, t, duration, skipped=step in skipped,
                                nonfinite=live, grad_norm=st.grad_norm, lr=lr_used)
            if spec.eval_due(step):
                try:
                    report.eval_loss, report.eval_s = self._evaluate()
                except RuntimeError as e:  # a collective: a peer was lost
                    error = f"rank {self.rank} evaluating after step {step}: {short_error(e)}"
            # The optimizer has stepped (or skipped): the step is done, whatever the vote does.
            self._reports.append(report)
            if error is not None:
                return True
            streak = streak + 1 if live else 0
            if limit is not None and streak >= limit:
                poisoned = True
                return True  # the vote in flight is finished below, on every rank alike
            saving = self.saver.flags() if self.saver is not None else (0, 0)
            try:
                decided, save, busy, answering = vote.cast(
                    (self._stop, self._save_request, *saving), again=step < until_step)
                return self._after_vote(step, decided, save, busy, answering)
            except RuntimeError as e:  # the vote or a save's agreement: a peer was lost
                error = f"rank {self.rank} after step {step}: {short_error(e)}"
                return True

        try:
            run_steps(st, seed=spec.seed, global_batch_size=spec.global_batch_size,
                      world_size=self.world_size, rank=self.rank, device=self.device,
                      until_step=until_step, after_step=after_step, skip=skipped,
                      prefetch=spec.prefetch)
        except StepError as e:  # a peer died or hung: gloo/nccl raise inside the step
            error = f"rank {self.rank} step {e.step}: {short_error(e.cause)}"
        if error is None:
            try:  # a vote still in flight when the loop stopped: finish it on every rank
                vote.finish()
                if self.saver is not None:
                    with self._phase("saving a checkpoint"):
                        if spec.checkpoint_final and st.step == spec.total_steps \
                                and self.saver.last_step != st.step and not poisoned:
                            self._checkpoint()
                        self.saver.wait()  # every save of this call is reported first
            except RuntimeError as e:
                error = f"rank {self.rank} after step {st.step}: {short_error(e)}"
        if error is not None:
            # Outside the except blocks, so the tracebacks (and the group they reference) are
            # gone; drop this frame's references too (FSDP2's shards hold the group through its
            # mesh; the vote's work, the control group).
            st = vote = after_step = None
            self._broken = True
            self._teardown()
            raise WorkerError(error)
        return TrainResult(st.step, st.step < until_step, nonfinite=poisoned)

    def _evaluate(self) -> Tuple[float, float]:
        """(held-out loss, seconds): a collective of the whole group (train.evaluate)."""
        t0 = time.time()
        spec, st = self.spec, self.state
        batch = st.recipe.micro_batch_size or -(-spec.global_batch_size // self.world_size)
        loss = eval_loss(st.model, self.task, seed=spec.seed, samples=spec.eval_samples,
                         world_size=self.world_size, rank=self.rank, device=self.device,
                         batch_size=batch, precision=st.recipe.precision)
        return loss, time.time() - t0

    def _after_vote(self, step: int, decided: int, save: int, busy: int = 0,
                    answering: int = 0) -> bool:
        """Act on the vote agreed after the previous step, now that step `step` is done: give up
        a save stuck on storage, then stop (with a checkpoint if asked), or save if a request or
        the interval says so. Returns whether to stop."""
        if self.saver is not None and self.saver.stuck(busy, answering):
            self.saver.give_up()
        if decided >= StopMode.CHECKPOINT:
            if self.saver is not None and self.saver.last_step != step:
                self._checkpoint()
            return True
        if decided >= StopMode.PAUSE:
            return True
        interval = self.spec.checkpoint_interval
        requested = save > self._saved_request
        self._saved_request = max(self._saved_request, save)
        if self.saver is not None and step < self.spec.total_steps and (
                requested or (interval and step % interval == 0)):
            self._checkpoint()
        return False

    def _checkpoint(self) -> None:
        t0 = time.time()  # the stall includes gathering the state dict, not only staging it
        beside = self.state.optimizer if self.spec.checkpoint_beside_step else None
        with self._phase("saving a checkpoint"):  # (async: the copy alone, beside the step)
            self.saver.save(self.state.step, checkpoint_state(self.state, self.rank),
                            started=t0, optimizer=beside)
        if self._kill_in_checkpoint:
            threading.Thread(target=self._kill_while_writing, args=(self.saver,),
                             daemon=True).start()

    @staticmethod
    def _kill_while_writing(saver: CheckpointSaver) -> None:
        deadline = time.monotonic() + 5.0
        while saver.files_written < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)

    @ray.method(concurrency_group="train")
    def final_digest(self) -> Optional[str]:
        """sha256 of the full model state. A collective under FSDP2: call on every rank; rank 0
        returns the digest, the others None."""
        assert self.state is not None
        try:
            with self._phase("taking the final digest"):
                sd = full_model_state(self.state)
                digest = weights_digest(sd) if self.rank == 0 else None
                del sd
        except RuntimeError as e:  # a peer was lost during the gather (FSDP2)
            error = f"rank {self.rank} taking the final digest: {short_error(e)}"
        else:
            return digest
        self._broken = True
        self._teardown()
        raise WorkerError(error)
