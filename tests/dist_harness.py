"""Run the train/ layer on W local processes with gloo, without Ray: the reference the
coordinator's runs and the parallelism modes are compared against."""

import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train import data as data_lib
from train import parallel
from train.state import build_state, full_model_state
from train.step import train_step
from train.task import make_task


def _worker(rank, world, port, out, parallelism, steps, task, task_args, gbs, seed):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=(rank == 0),
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    t = make_task(task, task_args)
    st = build_state(t, parallelism, torch.device("cpu"), seed, steps)
    parallel.prime(st.model, t.loss, data_lib.local_batch(t, seed, 0, gbs, world, rank))
    losses = []
    for step in range(steps):
        batch = data_lib.local_batch(t, seed, step, gbs, world, rank)
        loss = train_step(st.model, st.optimizer, st.scheduler, t.loss, batch,
                          data_lib.loss_scale(gbs, world, rank))
        part = torch.tensor([loss * data_lib.share(gbs, world, rank)])
        dist.all_reduce(part)
        losses.append(float(part))
    sd = full_model_state(st)
    if rank == 0:
        torch.save({"state": sd, "losses": losses}, out)
    dist.barrier()  # nobody leaves while a peer may still talk to it: gloo aborts on a closed peer
    dist.destroy_process_group()


def run_world(world, parallelism="ddp", steps=3, task="train.tasks.gpt:TinyGPT", task_args=None,
              gbs=12, seed=0):
    """Train `steps` steps on `world` processes; returns (full model state, global losses)."""
    from conftest import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "state.pt")
        ctx = mp.start_processes(
            _worker, args=(world, free_port(), out, parallelism, steps, task, task_args or {},
                           gbs, seed), nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + 240
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world of {world} did not finish in 240s")
        finally:
            for p in ctx.processes:  # never leave a rank behind
                if p.is_alive():
                    p.kill()
        result = torch.load(out, weights_only=True)
    return result["state"], result["losses"]
