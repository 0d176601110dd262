"""A replica's state to the members that lack it (the DDP recovery path): only the receivers
receive, every holder sends a stripe, the state lands in the receivers' own tensors, every byte
is checked on the way (a flipped bit is caught and every rank agrees on the outcome), and it
loads in the corners that broke it: a stateless optimizer (plain SGD), an optimizer that never
stepped, and gradients left by a step that failed. The full-state load an FSDP2 group that grows
uses runs in a subprocess with a one-rank gloo group (DCP's state-dict calls need a process
group; the test process must not keep one)."""

import pickle
import subprocess
import sys

import google_crc32c
import pytest
import torch

from conftest import ROOT, free_port
from coordinator import crc32c
from coordinator.workers.peer_transfer import StateTransferMismatch, flip_bit, stripes
from dist_harness import transfer_world


@pytest.mark.unit
def test_crc32c_in_place_equals_the_library_on_every_kind_of_buffer():
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    want = google_crc32c.value(bytes(data.numpy()))
    assert crc32c.value(data) == want
    assert crc32c.value(data.numpy()) == want and crc32c.value(bytes(data.numpy())) == want
    assert crc32c.value(memoryview(bytes(data.numpy()))) == want  # read-only: copied
    # in pieces, in order: the same as at once
    crc = 0
    for a in range(0, data.numel(), 1000003):
        crc = crc32c.extend(crc, data[a:a + 1000003])
    assert crc == want
    floats = torch.randn(1000)
    assert crc32c.value(floats) == google_crc32c.value(floats.numpy().tobytes())
    assert crc32c.value(b"") == 0 and crc32c.value(torch.empty(0)) == 0
    bad = data.clone()
    bad[12345] ^= 4
    assert crc32c.value(bad) != want


@pytest.mark.unit
def test_stripes_deal_every_byte_once_in_order_and_about_evenly():
    sizes = [0, 5, 100, 37, 64, 1, 300]
    for holders in (1, 2, 3, 7):
        cut = stripes(sizes, holders, chunk=16)
        assert len(cut) == holders
        flat = [p for stripe in cut for p in stripe]
        # every tensor's bytes, chunk by chunk, in order, nothing twice or missing
        covered = {}
        for p in flat:
            assert 0 < p.nbytes <= 16
            covered.setdefault(p.tensor, []).append((p.start, p.nbytes))
        for i, size in enumerate(sizes):
            spans = covered.get(i, [])
            assert sum(n for _, n in spans) == size
            assert [s for s, _ in spans] == list(range(0, size, 16))
        assert [(p.tensor, p.start) for p in flat] == sorted((p.tensor, p.start) for p in flat)
        load = [sum(p.nbytes for p in stripe) for stripe in cut]
        assert max(load) - min(load) <= 2 * 16, (holders, load)


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
def test_only_the_receivers_receive_the_holders_stripes_into_their_own_state():
    """Four gloo processes. Ranks 0 and 2 hold the replica (3 steps); rank 1 is a survivor
    left behind (1 step: its optimizer state exists, it receives into it), rank 3 a newcomer
    that never stepped; both have a failed step's gradients lying about. After the
    transfer every rank holds the same state (weights, Adam moments, hyper-parameters, step), the
    holders received nothing and each sent about half, and the four stay equal as they train
    on. A stateless optimizer (plain SGD) goes the same way."""
    out = transfer_world(4, holders=[0, 2], steps=[3, 1, 3, 0])
    assert [r["mismatch"] for r in out] == [None] * 4
    assert len({r["digest"] for r in out}) == 1 and {r["step"] for r in out} == {3}
    assert len({r["after"] for r in out}) == 1
    assert out[0]["received"] == out[2]["received"] == 0
    state = out[3]["received"]
    assert out[1]["received"] == state > out[3]["state_bytes"]  # the optimizer state came too
    assert abs(out[0]["sent"] - out[2]["sent"]) <= 2 * (16 << 20), "the stripes are uneven"
    assert out[0]["sent"] + out[2]["sent"] == 2 * state
    sgd = transfer_world(2, holders=[0], steps=[2, 0], task="dist_harness:PlainSGD")
    assert [r["mismatch"] for r in sgd] == [None] * 2
    assert sgd[0]["digest"] == sgd[1]["digest"] and sgd[0]["after"] == sgd[1]["after"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_corrupted_transfer_is_refused_by_every_rank():
    """A bit flipped on the wire after its checksum: every rank (the holder too) raises the
    same mismatch after the vote, and nobody was left waiting in a collective (the harness's
    barrier after the transfer completes). The holder's own state is untouched."""
    bad = transfer_world(3, holders=[1], steps=[0, 2, 0], corrupt=True)
    seen = bad[0]["mismatch"]
    assert seen is not None and all(r["mismatch"] == seen for r in bad), bad
    src, expected, got = seen
    assert src == 1 and sorted(got) == [0, 2] and all(g != expected for g in got.values())
    clean = transfer_world(3, holders=[1], steps=[0, 2, 0])
    assert bad[1]["digest"] == clean[1]["digest"], "the sender's own state is untouched"


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
