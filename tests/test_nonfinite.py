"""Poisoned steps (failure.nonfinite): a step whose loss or gradient norm is non-finite on any
rank is skipped on every rank, and a replay that skips it by number trains bit-identically. The
NaN is real: a sample whose inputs are NaN (MLPRegression's `nan_samples`) or a gradient made
NaN inside the real backward, through the real gloo all-reduce."""

import math

import pytest
import torch

from dist_harness import run_world
from train import data as data_lib
from train.loop import run_steps
from train.state import build_state, full_model_state, weights_digest
from train.step import train_step
from train.task import make_task

CPU = torch.device("cpu")
MLP = "train.tasks.mlp:MLPRegression"
GBS = 8


def _state(**task_args):
    task = make_task(MLP, task_args)
    return build_state(task, "ddp", CPU, 0, 100, wrap_ddp=False)


def _digest(st):
    return weights_digest(full_model_state(st))


def _run(st, until, skip=None):
    losses = []
    run_steps(st, seed=0, global_batch_size=GBS, world_size=1, rank=0, device=CPU,
              until_step=until, skip=skip,
              after_step=lambda step, loss, *a: losses.append(loss) and False)
    return losses


@pytest.mark.unit
def test_a_nan_batch_is_skipped_and_the_model_is_untouched():
    """Step 3 draws sample 2*GBS+1, whose inputs are NaN: no optimizer step (weights and optimizer
    state as after step 2), the scheduler-free task's step count still advances, the loss is
    reported as NaN, and the step is recorded as skipped."""
    st = _state(nan_samples=[2 * GBS + 1])
    skip = set()
    _run(st, 2, skip)
    before = _digest(st)
    momentum = [s["momentum_buffer"].clone() for s in st.optimizer.state.values()]
    losses = _run(st, 3, skip)
    assert st.step == 3 and skip == {3} and math.isnan(losses[-1])
    assert _digest(st) == before
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in
               zip(momentum, st.optimizer.state.values()))
    assert all(p.grad is None for p in st.model.parameters())
    later = _run(st, 5, skip)
    assert all(math.isfinite(x) for x in later) and skip == {3} and _digest(st) != before


@pytest.mark.unit
def test_a_replay_that_skips_the_step_by_number_is_bit_identical():
    """The run that met the NaN batch live, and a clean run told to skip step 3, end equal; a
    clean run that trains step 3 does not."""
    live = _state(nan_samples=[2 * GBS])
    _run(live, 6, set())
    replay = _state()
    skip = {3}
    _run(replay, 6, skip)
    assert skip == {3} and _digest(replay) == _digest(live)
    plain = _state()
    _run(plain, 6)
    assert _digest(plain) != _digest(live)


@pytest.mark.unit
def test_a_non_finite_gradient_with_a_finite_loss_is_skipped():
    """sqrt at 0 has an infinite derivative: the loss stays finite, the gradients are NaN."""
    st = _state()
    task = st.task
    batch = data_lib.local_batch(task, 0, 0, GBS, 1, 0)
    first = next(st.model.parameters())

    def finite_loss_nan_grad(model, b):
        return task.loss(model, b) + 0.0 * torch.sqrt(first.sum() * 0.0)

    before = _digest(st)
    out = train_step(st.model, st.optimizer, st.scheduler, finite_loss_nan_grad, batch, 1.0)
    assert math.isfinite(out.loss) and not out.applied and _digest(st) == before
    out = train_step(st.model, st.optimizer, st.scheduler, task.loss, batch, 1.0)
    assert out.applied and _digest(st) != before


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_one_ranks_nan_batch_makes_every_rank_skip(parallelism):
    """World 2, gloo: sample 19 (step 2 draws samples 12..23) sits in rank 1's slice
    only; rank 0's own loss is finite. Both ranks skip step 2 (the NaN reaches rank 0 through the
    gradient reduction), and the run equals a clean run told to skip step 2."""
    poisoned, skipped = {"nan_samples": [19]}, []
    state, losses = run_world(2, parallelism, steps=4, task=MLP, task_args=poisoned,
                              skipped=skipped)
    assert skipped == [2] and math.isnan(losses[1])
    assert all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
    ref, _ = run_world(2, parallelism, steps=4, task=MLP, skip=[2])
    for k in ref:
        assert torch.equal(ref[k], state[k]), k
    for k, v in state.items():
        assert torch.isfinite(v).all(), k
