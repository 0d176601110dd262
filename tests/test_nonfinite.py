"""Poisoned steps (failure.nonfinite): a step whose loss or gradient norm is non-finite on any
rank is skipped on every rank, and a replay that skips it by number trains bit-identically. The
NaN is real: a sample whose inputs are NaN (MLPRegression's `nan_samples`) or a gradient made
NaN inside the real backward, through the real gloo all-reduce."""

import math
import os

import pytest
import torch

from conftest import NO_CHAOS, ROOT, run_cli
from coordinator.checkpoint import manifest as mf
from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.saver import CheckpointSaver
from coordinator.events import EventLog, read_events
from conftest import run_events, run_summary
from dist_harness import run_world
from train import data as data_lib
from train.loop import run_steps
from train.state import build_state, checkpoint_state, full_model_state, weights_digest
from train.step import train_step
from train.task import make_task

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_first_nonfinite_finds_each_kind_in_each_float_dtype(dtype):
    from train.state import first_nonfinite

    t = torch.randn(100).to(dtype)
    clean = {"a": t, "empty": torch.empty(0, dtype=dtype), "n": torch.arange(3), "s": 1.5}
    assert first_nonfinite(clean) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[7] = bad
        assert first_nonfinite({"x": {"y": [t, u]}, "z": u}) == "x.y.1", bad


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


@pytest.mark.unit
def test_a_state_with_a_non_finite_value_is_never_committed(world1, tmp_path):
    """An update can be finite and still overflow the weights: a loss of ~1e14 (finite, as are
    its gradients and their norm) with lr 1e25 moves the weights by ~1e39, beyond float32, in one real step.
    That state is written, reported failed by the rank that holds it, and not committed; a
    later finite state commits."""
    uri = str(tmp_path / "ckpt")
    log = EventLog(str(tmp_path / "events.jsonl"))
    committer = Committer(uri, {}, 3, True, "hash0", log)
    good = _state()
    _run(good, 1)
    bad = _state(lr=1e25)
    plain = bad.task.loss
    bad.task.loss = lambda model, batch: plain(model, batch) * 1e15
    losses = _run(bad, 1)
    assert math.isfinite(losses[0]) and not all(torch.isfinite(p).all()
                                                for p in bad.model.parameters())
    for st in (bad, good):
        saver = CheckpointSaver(uri, {}, True, 0, world1)
        st.step = 1 if st is bad else 2
        saver.save(st.step, checkpoint_state(st, 0))
        saver.close()
        for rep in saver.reports:
            committer.on_save(rep)
    assert committer.failed == [1] and committer.committed == [2]
    (failed,) = [e for e in read_events(log.path) if e["event"] == "checkpoint_failed"]
    assert failed["step"] == 1 and "non-finite values (model." in failed["reason"]
    # retention removed the uncommitted step 1 once step 2 committed
    assert [(c.step, c.status) for c in mf.list_checkpoints(uri, {}, verify=True)] == [
        (2, "committed")]


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


def _cli(run_dir, *overrides):
    return run_cli(["run", CONFIG, NO_CHAOS, "ray.simulated_nodes=0", "scaling.min_workers=2",
                    "scaling.max_workers=2", "train.global_batch_size=12",
                    f"run.dir={run_dir}", *overrides])


def _verify_clean(run_dir):
    proc = run_cli(["inspect", str(run_dir / "checkpoints"), "--verify"])
    assert proc.returncode == 0 and " 0 corrupt" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_a_poisoned_gradient_rolls_back_and_replays_bit_identically(tmp_path):
    """Chaos makes rank 1's loss NaN inside a step (so its gradient, and through the all-reduce
    everyone's); with failure.nonfinite_limit=1 the job rolls back to the last committed
    checkpoint and replays skipping that step. The final weights equal plain DDP told to skip it,
    and every committed checkpoint verifies clean."""
    run_dir = tmp_path / "run"
    # 120 steps, so the run is still going when the driver sees step 8 and fires the fault
    # (24 steps can all be done before that on a loaded machine: the fault then lands nowhere).
    proc = _cli(run_dir, "train.steps=120", "checkpoint.interval_steps=5",
                "failure.nonfinite_limit=1",
                "chaos.events=[{at_step: 8, action: nonfinite, target: 1}]")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 120 and s["rollbacks"] == 1
    (k,) = s["nonfinite_steps"]
    assert k > 8 and s["recoveries"] == 1 and s["world_sizes"] == [2, 2]
    events = run_events(run_dir)
    (nf,) = [e for e in events if e["event"] == "nonfinite_step"]
    assert nf["step"] == k and nf["action"] == "rollback"
    formed = [e for e in events if e["event"] == "group_formed"][-1]
    assert formed["source"] == "checkpoint" and formed["step"] < k
    assert "non-finite loss or gradient norm" in proc.stdout and "Traceback" not in proc.stdout
    state, _ = run_world(2, "ddp", steps=120, gbs=12, skip=[k])
    assert weights_digest(state) == s["weights_digest"]
    _verify_clean(run_dir)


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_fsdp_skips_a_nan_batch_and_stop_mode_ends_the_job(tmp_path):
    """FSDP2, 2 workers: sample 19 (step 2, rank 1's slice) is NaN. failure.nonfinite=skip trains
    on and ends equal to plain FSDP2 told to skip step 2; failure.nonfinite=stop ends the job at
    step 2 with exit 3 and the reason, committing nothing poisoned."""
    task = ["train.task=train.tasks.mlp:MLPRegression", "train.task_args={nan_samples: [19]}",
            "train.parallelism=fsdp", "train.steps=8", "checkpoint.interval_steps=4"]
    run_dir = tmp_path / "skip"
    proc = _cli(run_dir, *task, "failure.nonfinite=skip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["nonfinite_steps"] == [2] and s["rollbacks"] == 0
    assert math.isfinite(s["final_loss"])
    state, _ = run_world(2, "fsdp", steps=8, gbs=12, task=MLP, skip=[2])
    assert weights_digest(state) == s["weights_digest"]
    _verify_clean(run_dir)

    run_dir = tmp_path / "stop"
    proc = _cli(run_dir, *task, "failure.nonfinite=stop")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "failed" and s["steps"] == 2
    assert s["error"].startswith("step 2: non-finite loss or gradient norm "
                                 "(failure.nonfinite=stop)")
    assert s["error"] in proc.stdout and "Traceback" not in proc.stdout
    assert s["checkpoints_committed"] == 0
