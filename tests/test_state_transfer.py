"""A survivor's full state loaded by its peers (the DDP recovery path), in the corners that
broke it: a stateless optimizer (plain SGD), an optimizer that never stepped, and gradients left
by a step that failed. Run in a subprocess with a one-rank gloo group (DCP's state-dict calls
need a process group; the test process must not keep one)."""

import subprocess
import sys

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.unit

SCRIPT = r"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from train.loop import run_steps
from train.state import apply_full_state, build_state, full_model_state, full_state, weights_digest
from train.task import make_task
from train.tasks.mlp import MLPRegression

CPU = torch.device("cpu")


class SGDTask(MLPRegression):
    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05)  # no momentum: no state at all


def state(task, steps):
    st = build_state(task, "ddp", CPU, 0, 20, wrap_ddp=False)
    run_steps(st, seed=0, global_batch_size=8, world_size=1, rank=0, device=CPU,
              until_step=steps)
    return st


def check(task, steps, dirty):
    src = state(task, steps)
    dst = build_state(task, "ddp", CPU, 0, 20, wrap_ddp=False)
    if dirty:  # a step that died inside its backward: gradients, no optimizer step
        batch = task.collate([task.sample(i, 1) for i in range(4)])
        task.loss(dst.model, batch).backward()
    # a copy, as the broadcast delivers it (the same process would share src's tensors)
    apply_full_state(dst, copy.deepcopy(full_state(src, sharded=False)))
    # both go on for 3 more steps: they must stay equal, bit for bit
    for st in (src, dst):
        run_steps(st, seed=0, global_batch_size=8, world_size=1, rank=0, device=CPU,
                  until_step=steps + 3)
    same = weights_digest(full_model_state(src)) == weights_digest(full_model_state(dst))
    print(type(task).__name__, steps, dirty, same, len(src.optimizer.state) == len(dst.optimizer.state))


check(SGDTask(), 3, False)
check(SGDTask(), 0, True)
check(make_task("train.tasks.gpt:TinyGPT", {}), 0, True)  # AdamW that never stepped
check(make_task("train.tasks.gpt:TinyGPT", {}), 2, True)
check(make_task("train.tasks.mlp:MLPRegression", {}), 2, False)  # SGD with momentum
dist.destroy_process_group()
"""


def test_peer_state_loads_for_stateless_and_unstepped_optimizers_and_after_a_failed_step():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(free_port())], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    rows = [line.split() for line in lines if line.strip()]
    assert len(rows) == 5, out.stdout
    for name, steps, dirty, same, states in rows:
        assert same == "True", f"{name} at step {steps} (dirty={dirty}): replicas diverged"
        assert states == "True", f"{name} at step {steps}: optimizer states differ"
