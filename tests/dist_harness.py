"""Run the train/ layer on W local processes with gloo, without Ray: the reference the
coordinator's runs and the parallelism modes are compared against."""

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.evaluate import eval_loss
from train.loop import run_steps
from train.state import build_state, full_model_state
from train.step import Recipe
from train.task import make_task
from train.tasks.mlp import MLPRegression


class SizeCheckedMLP(MLPRegression):
    """MLPRegression that refuses a forward pass of more than `max_forward` samples: the
    per-forward batch a micro-batch size must bound, whatever the world size."""

    def __init__(self, max_forward: int, **kwargs):
        super().__init__(**kwargs)
        self.max_forward = max_forward

    def loss(self, model, batch):
        n = batch["x"].shape[0]
        if n > self.max_forward:
            raise ValueError(f"a forward pass of {n} samples > max_forward={self.max_forward}")
        return super().loss(model, batch)


class PlainSGD(MLPRegression):
    """An optimizer with no state at all (SGD without momentum)."""

    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05)


def _worker(rank, world, port, out, parallelism, steps, task, task_args, gbs, seed, skip,
            recipe=None, evaluate=(0, 0), shard_group_size=None):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    t = make_task(task, task_args)
    st = build_state(t, parallelism, torch.device("cpu"), seed, steps,
                     recipe=Recipe(**(recipe or {})), shard_group_size=shard_group_size)
    losses, evals = [], []
    every, samples = evaluate

    def global_loss(step, weighted_loss, _t, duration):
        part = torch.tensor([weighted_loss])
        dist.all_reduce(part)
        losses.append(float(part))
        if every and step % every == 0:
            batch = st.recipe.micro_batch_size or -(-gbs // world)
            evals.append(eval_loss(st.model, t, seed=seed, samples=samples, world_size=world,
                                   rank=rank, device=torch.device("cpu"), batch_size=batch,
                                   precision=st.recipe.precision))
        return False

    skipped = set(skip)
    run_steps(st, seed=seed, global_batch_size=gbs, world_size=world, rank=rank,
              device=torch.device("cpu"), until_step=steps, after_step=global_loss,
              skip=skipped)
    sd = full_model_state(st)
    from coordinator.procmem import peak_rss_bytes

    with open(f"{out}.rss{rank}", "w") as f:
        f.write(str(peak_rss_bytes() or 0))
    if rank == 0:
        torch.save({"state": sd, "losses": losses, "skipped": sorted(skipped), "evals": evals},
                   out)
    dist.barrier()  # nobody leaves while a peer may still talk to it: gloo aborts on a closed peer
    dist.destroy_process_group()
    _leave()


def _leave():
    """End a rank without interpreter finalisation: its result is on disk, and C++ destructors
    run at exit once aborted a rank here ("terminate called without an active exception",
    SIGABRT) after a 6000-step run had finished its work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world, parallelism="ddp", steps=3, task="train.tasks.gpt:TinyGPT", task_args=None,
              gbs=12, seed=0, skip=(), skipped=None, recipe=None, evaluate=(0, 0), evals=None,
              shard_group_size=None, peak_rss=None):
    """Train `steps` steps on `world` processes; returns (full model state, global losses).
    `skip`: steps to skip (see run_steps); `skipped`: a list that receives every step skipped.
    `recipe`: keyword arguments of `train.step.Recipe` (micro-batches, precision, clipping).
    `evaluate`: (every, samples): the held-out loss (train.evaluate) after every `every`
    steps, over `samples` samples, into the list `evals`. `shard_group_size`: HSDP's.
    `peak_rss`: a list that receives each rank's peak resident bytes (VmHWM)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "state.pt")
        _spawn(_worker, world, (out, parallelism, steps, task, task_args or {}, gbs, seed,
                                tuple(skip), recipe, tuple(evaluate), shard_group_size))
        result = torch.load(out, weights_only=True)
        if peak_rss is not None:
            for r in range(world):
                with open(f"{out}.rss{r}") as f:
                    peak_rss.append(int(f.read()))
    if skipped is not None:
        skipped.extend(result["skipped"])
    if evals is not None:
        evals.extend(result["evals"])
    return result["state"], result["losses"]


def _full_states(st):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(st.model, st.optimizer, options=opts)


def _reshard_worker(rank, world, port, out, phase, ckpt, parallelism, steps):
    from coordinator.checkpoint.saver import CheckpointSaver, load_checkpoint
    from train.state import apply_loaded, checkpoint_state, load_template

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    group = dist.new_group(backend="gloo")
    t = make_task("train.tasks.gpt:TinyGPT", {})
    gbs = 12
    if phase == "save":
        st = build_state(t, parallelism, torch.device("cpu"), 0, 50)
        run_steps(st, seed=0, global_batch_size=gbs, world_size=world, rank=rank,
                  device=torch.device("cpu"), until_step=steps)
        saver = CheckpointSaver(ckpt, {}, True, rank, group,
                                split_replicated=parallelism == "ddp")
        saver.save(st.step, checkpoint_state(st, rank))
        saver.close()
        assert saver.reports[0].ok, saver.reports[0].error
    else:
        st = build_state(t, parallelism, torch.device("cpu"), 123, 50)  # another init
        path = f"{ckpt}/step-{steps:08d}"
        sd = load_checkpoint(path, {}, lambda saved: load_template(st, rank, saved), group)
        apply_loaded(st, sd, rank)
    model_sd, optim_sd = _full_states(st)
    if rank == 0:
        torch.save({"model": model_sd, "optim": optim_sd, "step": st.step,
                    "last_epoch": st.scheduler.last_epoch}, out)
    dist.barrier()
    dist.destroy_process_group()
    _leave()


def reshard_roundtrip(world_save, world_load, parallelism="fsdp", steps=3):
    """Train on `world_save` ranks and checkpoint; load on `world_load` ranks. Returns the full
    (gathered) states as saved and as loaded."""
    results = []
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "ckpt")
        for phase, world in (("save", world_save), ("load", world_load)):
            out = os.path.join(d, f"{phase}.pt")
            _spawn(_reshard_worker, world, (out, phase, ckpt, parallelism, steps))
            results.append(torch.load(out, weights_only=True))
    return results


def _state_digest(st) -> str:
    """sha256 of a DDP rank's whole state: weights, optimizer state and hyper-parameters, step."""
    import hashlib

    from train.state import weights_digest

    h = hashlib.sha256(weights_digest(st.model.state_dict()).encode())
    osd = st.optimizer.state_dict()
    for idx in sorted(osd["state"]):
        for key in sorted(osd["state"][idx]):
            v = osd["state"][idx][key]
            h.update(f"{idx}|{key}|".encode())
            h.update(v.detach().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if isinstance(v, torch.Tensor) else repr(v).encode())
    h.update(repr([{k: v for k, v in g.items() if k != "params"}
                   for g in osd["param_groups"]]).encode())
    h.update(f"|{st.step}".encode())
    return h.hexdigest()


def _transfer_worker(rank, world, port, out_dir, holders, steps, corrupt, task, more):
    from coordinator.workers.peer_transfer import StateTransferMismatch, flip_bit, transfer

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    t = make_task(task, {})
    cpu = torch.device("cpu")
    st = build_state(t, "ddp", cpu, 0, 50, wrap_ddp=False)
    # each rank trains alone for its own number of steps: a holder's state differs from a
    # receiver's, and a receiver may have stepped (its optimizer state exists) or not
    run_steps(st, seed=0, global_batch_size=4, world_size=1, rank=0, device=cpu,
              until_step=steps[rank])
    if rank not in holders:  # a step that died inside its backward: gradients left behind
        batch = t.collate([t.sample(i, 1) for i in range(2)])
        t.loss(st.model, batch).backward()
    before = _state_digest(st)
    try:
        stats = transfer(st, holders, None, tamper=flip_bit if corrupt else None)
    except StateTransferMismatch as e:
        result = {"mismatch": (e.src, e.expected, e.got), "digest": before}
    else:
        result = {"mismatch": None, "digest": _state_digest(st), "step": st.step,
                  "received": stats.received_bytes, "sent": stats.sent_bytes,
                  "state_bytes": sum(v.numel() * v.element_size()
                                     for v in st.model.state_dict().values())}
        # every rank goes on alone: equal states must stay equal, bit for bit
        run_steps(st, seed=0, global_batch_size=4, world_size=1, rank=0, device=cpu,
                  until_step=st.step + more)
        result["after"] = _state_digest(st)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank got past the transfer and its vote: nobody was left in one
    dist.destroy_process_group()
    _leave()


def transfer_world(world, holders, steps, corrupt=False, task="train.tasks.gpt:TinyGPT",
                   more=2):
    """On `world` gloo processes, rank r trains `steps[r]` steps alone, then the ranks not in
    `holders` take the holders' state with `coordinator.workers.peer_transfer.transfer`
    (`corrupt`: a bit of one chunk flipped on the wire, after its checksum). Returns each rank's
    outcome: {mismatch: None or (src, expected, got), digest: its whole state after, step,
    received, sent, after: its state after `more` further steps}."""
    with tempfile.TemporaryDirectory() as d:
        _spawn(_transfer_worker, world, (d, holders, steps, corrupt, task, more))
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True)
                for r in range(world)]


def _spawn(fn, world, args, attempts=2):
    """Run `fn` on `world` spawned ranks. This harness is the oracle (plain torch, none of our
    code): a rank killed by a signal (a crash inside torch or gloo, not a Python error) gets the
    whole world rerun once, said on stderr, rather than failing the test that asked for a
    reference."""
    for attempt in range(1, attempts + 1):
        try:
            return _spawn_once(fn, world, args)
        except mp.ProcessExitedException as e:
            if e.signal_name is None or attempt == attempts:
                raise
            print(f"dist_harness: reference world of {world} lost a rank to {e.signal_name}; "
                  f"rerunning it (attempt {attempt + 1} of {attempts})", file=sys.stderr)


def _spawn_once(fn, world, args):
    # The store lives here, as in the coordinator's driver: a rank that exits first (rank 0
    # included) must not take the store away from peers still tearing down.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    ctx = mp.start_processes(fn, args=(world, store.port, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"world of {world} did not finish in 240s")
    finally:
        for p in ctx.processes:  # never leave a rank behind
            if p.is_alive():
                p.kill()
