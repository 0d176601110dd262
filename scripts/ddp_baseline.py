"""Plain DDP under torchrun, no coordinator: the baseline of scripts/bench_overhead.py.

    torchrun --nproc-per-node 4 scripts/ddp_baseline.py --steps 300 --out result.json

The coordinator's workers' rank loop (train.loop.run_steps: same task, data slicing, loss weighting
and train step) without their per-step hook; rank 0 writes the steady-state steps/s (after the same
warm-up) and the final weights digest.
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

from train.loop import run_steps
from train.state import build_state, full_model_state, weights_digest
from train.task import make_task


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="train.tasks.gpt:TinyGPT")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--parallelism", default="ddp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    task = make_task(a.task, {})
    st = build_state(task, a.parallelism, torch.device("cpu"), a.seed, a.steps)
    torch.manual_seed(a.seed * 100_003 + 1 + rank)
    warm = max(1, min(a.steps // 10, 50))  # the coordinator's warm-up (controller.py)
    loop = dict(seed=a.seed, global_batch_size=a.global_batch_size, world_size=world, rank=rank,
                device=torch.device("cpu"))
    run_steps(st, until_step=warm, **loop)
    t_warm = time.time()
    run_steps(st, until_step=a.steps, **loop)
    t_end = time.time()
    digest = weights_digest(full_model_state(st)) if rank == 0 else None
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"steps_per_s": (a.steps - warm) / (t_end - t_warm), "world": world,
                       "weights_digest": digest}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
