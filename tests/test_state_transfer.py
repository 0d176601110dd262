"""A survivor's full state sent to its peers (the DDP recovery path): checked on the way (the
checksum catches a flipped bit and every rank agrees on the outcome), and loaded in the corners
that broke it: a stateless optimizer (plain SGD), an optimizer that never stepped, and gradients
left by a step that failed. The loading runs in a subprocess with a one-rank gloo group (DCP's
state-dict calls need a process group; the test process must not keep one)."""

import pickle
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port
from coordinator.checkpoint.restore import StateTransferMismatch, checksum, flip_bit, verify
from dist_harness import transfer_world


@pytest.mark.unit
def test_equal_buffers_pass_and_any_flipped_bit_is_caught():
    skeleton = b'{"d": [[{"v": "model"}, {"t": 0}]]}'
    packed = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=torch.Generator()
                           .manual_seed(0))
    expected = checksum(skeleton, packed)
    assert verify(expected, skeleton, packed.clone()) is None
    # the receiver's split need not be the sender's: the checksum runs over the bytes in order
    assert checksum(skeleton + bytes(packed.numpy())) == expected
    assert checksum(b"", torch.empty(0, dtype=torch.uint8)) == checksum()
    for at in (0, 1, 4097, packed.numel() // 2, packed.numel() - 1):
        for bit in (0, 7):
            bad = packed.clone()
            bad[at] ^= 1 << bit
            assert verify(expected, skeleton, bad) not in (None, expected), (at, bit)
    bad_skeleton = bytearray(skeleton)
    bad_skeleton[3] ^= 0x20
    assert verify(expected, bytes(bad_skeleton), packed) is not None
    # two words swapped: a plain sum would not see it, the CRC does
    swapped = packed.clone()
    swapped[:8], swapped[8:16] = packed[8:16].clone(), packed[:8].clone()
    assert not torch.equal(swapped, packed) and verify(expected, skeleton, swapped) is not None


@pytest.mark.unit
def test_the_chaos_flip_changes_one_bit_and_the_mismatch_survives_pickling():
    buf = torch.zeros(9, dtype=torch.uint8)
    flip_bit(buf)
    assert buf.tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0]
    flip_bit(torch.empty(0, dtype=torch.uint8))  # nothing to flip: no error
    e = StateTransferMismatch(0, 0x1234abcd, {1: 0xdeadbeef, 2: 7})
    back = pickle.loads(pickle.dumps(e))  # it crosses the Ray boundary
    assert (back.src, back.expected, back.got) == (0, 0x1234abcd, {1: 0xdeadbeef, 2: 7})
    assert str(back) == str(e) and "1234abcd" in str(e) and "rank 1 got deadbeef" in str(e)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_corrupted_transfer_is_refused_by_every_rank_and_a_clean_one_arrives_whole():
    """Three gloo processes; rank 1 trains alone and sends its state. Clean: everyone ends with
    the sender's weights. A bit flipped after the checksum: every rank (the sender too) raises
    the same mismatch after the vote, nobody applied the state, and nobody was left waiting in a
    collective (the harness's barrier after the transfer completes)."""
    clean = transfer_world(3, src=1)
    assert [r["mismatch"] for r in clean] == [None] * 3
    assert len({r["digest"] for r in clean}) == 1 and {r["step"] for r in clean} == {2}
    bad = transfer_world(3, src=1, corrupt=True)
    seen = bad[0]["mismatch"]
    assert seen is not None and all(r["mismatch"] == seen for r in bad), bad
    src, expected, got = seen
    assert src == 1 and sorted(got) == [0, 2] and all(g != expected for g in got.values())
    assert bad[1]["digest"] == clean[1]["digest"], "the sender's own state is untouched"
    assert bad[0]["digest"] == bad[2]["digest"] != clean[0]["digest"], "nobody applied it"

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


@pytest.mark.unit
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
