"""A checkpoint's copy of the parameters and optimizer state runs beside the next step
(checkpoint/staging.py): the checkpoint still holds the state of the step it was taken at."""

import threading
import time

import pytest
import torch
from torch import nn

from coordinator.checkpoint import manifest as mf
from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.saver import CheckpointSaver, load_checkpoint
from coordinator.checkpoint.staging import copy_unheld, optimizer_storages
from coordinator.events import EventLog
from train import data as data_lib
from train.loop import run_steps
from train.state import (apply_loaded, build_state, checkpoint_state, full_model_state,
                         load_template, weights_digest)
from train.step import train_step
from train.task import make_task

pytestmark = pytest.mark.unit

TASK = "train.tasks.gpt:TinyGPT"
SLOW_COPY_S = 0.4


def _trained(steps):
    task = make_task(TASK, {})
    st = build_state(task, "ddp", torch.device("cpu"), 0, 100)
    run_steps(st, seed=0, global_batch_size=8, world_size=1, rank=0, device=torch.device("cpu"),
              until_step=steps)
    return task, st


def _slow_copy(saver, after=None):
    """The copy beside the step takes SLOW_COPY_S longer, counted from `after` (an event) when
    given: an update that did not wait for it would land in the checkpoint."""
    stage = saver._stage

    def slow(state, split):
        if after is not None:
            assert after.wait(30)
        time.sleep(SLOW_COPY_S)
        return stage(state, split)

    saver._stage = slow


def _restored_digest(uri, tmp_path, reports, group):
    committer = Committer(uri, {}, 3, True, "h", EventLog(str(tmp_path / "events.jsonl")))
    for rep in reports:
        committer.on_save(rep)
    committer.drain(30)
    (ci,) = mf.list_checkpoints(uri, {}, verify=True)
    st = build_state(make_task(TASK, {}), "ddp", torch.device("cpu"), 1, 100)
    sd = load_checkpoint(ci.path, {}, lambda saved: load_template(st, 0, saved), group)
    apply_loaded(st, sd, 0)
    return st


def test_the_next_update_waits_for_the_copy_and_the_checkpoint_is_the_step_saved(
        world1, tmp_path):
    task, st = _trained(3)
    expected = weights_digest(full_model_state(st))
    expected_moments = {k: v.clone() for k, v in st.optimizer.state_dict()["state"][0].items()}
    uri = str(tmp_path / "ckpt")
    saver = CheckpointSaver(uri, {}, True, 0, world1)
    # The copy starts only once the update has begun (a pre-hook ahead of the saver's): the
    # update must then wait for it, however long the forward and backward took.
    updating = threading.Event()
    st.optimizer.register_step_pre_hook(lambda *a: updating.set())
    _slow_copy(saver, after=updating)
    t0 = time.time()
    saver.save(3, checkpoint_state(st, 0), optimizer=st.optimizer)
    call_s = time.time() - t0
    # The next step: its forward and backward run while the copy is under way; its update waits.
    train_step(st.model, st.optimizer, st.scheduler, task.loss,
               data_lib.local_batch(task, 0, 3, 8, 1, 0), 1.0)
    assert weights_digest(full_model_state(st)) != expected  # the update did happen
    saver.close()
    assert len(st.optimizer._optimizer_step_pre_hooks) == 1  # the saver's went with it
    (rep,) = saver.reports
    assert rep.ok, rep.error
    assert call_s < SLOW_COPY_S  # the save returned before the copy
    assert rep.stall_s >= SLOW_COPY_S  # what the update waited counts as the stall
    restored = _restored_digest(uri, tmp_path, saver.reports, world1)
    assert weights_digest(full_model_state(restored)) == expected
    moments = restored.optimizer.state_dict()["state"][0]
    for k, v in expected_moments.items():
        assert torch.equal(moments[k], v), k


def test_without_the_optimizer_the_copy_is_made_at_the_boundary(world1, tmp_path):
    """checkpoint.stage_beside_step=false (the worker passes no optimizer): no hook, and the
    save's call holds the copy."""
    task, st = _trained(2)
    expected = weights_digest(full_model_state(st))
    uri = str(tmp_path / "ckpt")
    saver = CheckpointSaver(uri, {}, True, 0, world1)
    _slow_copy(saver)
    t0 = time.time()
    saver.save(2, checkpoint_state(st, 0))
    assert time.time() - t0 >= SLOW_COPY_S
    assert not st.optimizer._optimizer_step_pre_hooks
    train_step(st.model, st.optimizer, st.scheduler, task.loss,
               data_lib.local_batch(task, 0, 2, 8, 1, 0), 1.0)
    saver.close()
    restored = _restored_digest(uri, tmp_path, saver.reports, world1)
    assert weights_digest(full_model_state(restored)) == expected


def test_abandon_ends_the_copy_before_a_restore_may_write_the_state(world1, tmp_path):
    task, st = _trained(2)
    saver = CheckpointSaver(str(tmp_path / "ckpt"), {}, True, 0, world1)
    _slow_copy(saver)
    saver.save(2, checkpoint_state(st, 0), optimizer=st.optimizer)
    p = saver._current
    assert not p.copied.is_set()
    saver.abandon()  # a peer was lost: the survivors restore into their state next
    assert p.copied.is_set() and not st.optimizer._optimizer_step_pre_hooks


def test_only_what_the_optimizer_alone_updates_is_left_for_later():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)  # frozen: not the optimizer's
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # momentum buffers exist now
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    held = optimizer_storages(opt)
    out, later = copy_unheld(sd, held)
    m = out["model"]
    for name in ("0.weight", "0.bias", "1.weight", "1.bias", "2.bias"):
        assert m[name].data_ptr() == sd["model"][name].data_ptr(), name  # left for later
    for name in ("1.running_mean", "1.running_var", "2.weight"):
        assert m[name].data_ptr() != sd["model"][name].data_ptr(), name  # copied now
        assert torch.equal(m[name], sd["model"][name])
    momentum = [s["momentum_buffer"] for s in out["optim"]["state"].values()]
    assert len(momentum) == 5
    params = 8 * 8 + 8 + 8 + 8 + 2
    assert later == 2 * params * 4  # the parameters and their momentum, fp32


def test_host_copies_hold_a_view_at_its_own_size_and_are_reused_between_saves():
    """A DDP rank stages only its slice of each replicated tensor: the buffer is the slice's
    size (torch's DefaultStager would copy the whole storage behind the view), and the next
    save copies into the same buffers."""
    from coordinator.checkpoint.staging import HostCopies

    full = torch.arange(4000, dtype=torch.float32).reshape(400, 10)
    sd = {"model": {"w": full[100:200]}, "optim": [torch.ones(3)], "step": 7}
    copies = HostCopies()
    staged = copies.stage(sd)
    assert torch.equal(staged["model"]["w"], full[100:200]) and staged["step"] == 7
    assert staged["model"]["w"].untyped_storage().nbytes() == 100 * 10 * 4
    assert copies.nbytes == 100 * 10 * 4 + 3 * 4
    first = staged["model"]["w"].data_ptr()
    full.add_(1)
    again = copies.stage(sd)
    assert again["model"]["w"].data_ptr() == first, "the buffer is reused"
    assert torch.equal(again["model"]["w"], full[100:200])
    smaller = copies.stage({"model": {"w": full[:50]}, "optim": [torch.ones(3)], "step": 8})
    assert smaller["model"]["w"].shape == (50, 10)  # a new world size: a buffer of the new size
    copies.close()
    assert copies.nbytes == 0
