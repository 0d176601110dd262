"""One torchft replica group of one worker, training our TinyGPT job: the torchft side of
scripts/bench_recovery.py and scripts/bench_overhead.py (needs `pip install -e ".[bench]"`).

Configured the way torchft's own `train_ddp.py` example is: a `ProcessGroupGloo` with a 5 s
timeout, a `Manager` with `min_replica_size=1` and a 10 s timeout, its `DistributedDataParallel`
and `Optimizer` wrappers (the quorum starts in `zero_grad`, the step commits only if every
participant's did). Each group has its own TCPStore (a group of one: this process is its master).
Replica group `r` of `R` trains the samples our rank `r` of a world of `R` would, at the step the
manager says; the scheduler steps with each committed step.

Each committed step appends {"replica", "step", "t", "pid", "healed", "peak_rss"} to --log
(peak_rss: the process's VmHWM, bytes). With --kill-at, the
replica --kill-replica SIGKILLs itself once after committing that step (a marker file next to the
log keeps its restart from doing it again) and writes the kill's time into the marker.

    python scripts/torchft_replica.py --replica 0 --replicas 4 --lighthouse 127.0.0.1:29510 \\
        --steps 80 --log steps.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--lighthouse", required=True, help="host:port of torchft_lighthouse")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--task", default="train.tasks.gpt:TinyGPT")
    p.add_argument("--task-args", default="{}", help="the task's arguments, as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", required=True)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--kill-replica", type=int, default=1)
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    from train import data as data_lib
    from coordinator.procmem import peak_rss_bytes
    from train.task import make_task

    torch.set_num_threads(1)
    task = make_task(a.task, json.loads(a.task_args))
    torch.manual_seed(a.seed)
    model = task.build_model()
    inner = task.build_optimizer(model)
    sched = task.build_scheduler(inner, a.steps)

    def state_dict():
        return {"model": model.state_dict(), "optim": inner.state_dict(),
                "sched": sched.state_dict() if sched is not None else {}}

    healed = []

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["optim"])
        if sched is not None:
            sched.load_state_dict(sd["sched"])
        healed.append(time.time())

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=5)), min_replica_size=1,
        load_state_dict=load_state_dict, state_dict=state_dict,
        replica_id=f"bench_{a.replica}", timeout=timedelta(seconds=10),
        store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1,
        lighthouse_addr=f"http://{a.lighthouse}", hostname="127.0.0.1")
    ddp = DistributedDataParallel(manager, model)
    optimizer = Optimizer(manager, inner)
    marker = a.log + ".killed"
    with open(a.log, "a") as log:
        while manager.current_step() < a.steps:
            step = manager.current_step()
            batch = data_lib.local_batch(task, a.seed, step, a.global_batch_size, a.replicas,
                                         a.replica)
            optimizer.zero_grad()
            task.loss(ddp, batch).backward()
            optimizer.step()
            done = manager.current_step()
            if done == step:  # not committed (a participant failed): the step is tried again
                continue
            if sched is not None:
                sched.step()
            log.write(json.dumps({"replica": a.replica, "step": done, "t": time.time(),
                                  "pid": os.getpid(), "healed": bool(healed),
                                  "peak_rss": peak_rss_bytes()}) + "\n")
            log.flush()
            if a.kill_at and done == a.kill_at and a.replica == a.kill_replica \
                    and not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
