"""Micro-batches, bf16 and gradient clipping (train.step.Recipe) on real gloo process groups."""

import pytest
import torch

from dist_harness import run_world
from train import data as data_lib
from train.step import Recipe
from train.tasks.mlp import MLPRegression

pytestmark = pytest.mark.timeout(300)

MLP = "train.tasks.mlp:MLPRegression"
CHECKED = "dist_harness:SizeCheckedMLP"


def _close(a, b, rtol=1e-5, atol=1e-6):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _differs(a, b, atol):
    return any(not torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.mark.unit
def test_micro_batches_cover_the_slice_in_order_with_their_shares():
    task = MLPRegression()
    whole = data_lib.local_batch(task, 0, 3, 16, 2, 1)
    assert isinstance(data_lib.local_micro_batches(task, 0, 3, 16, 2, 1, None), dict)
    assert isinstance(data_lib.local_micro_batches(task, 0, 3, 16, 2, 1, 8), dict)
    parts = data_lib.local_micro_batches(task, 0, 3, 16, 2, 1, 3)  # 8 samples: 3 + 3 + 2
    assert [b["x"].shape[0] for b, _ in parts] == [3, 3, 2]
    assert [w for _, w in parts] == [3 / 8, 3 / 8, 2 / 8]
    assert torch.equal(torch.cat([b["x"] for b, _ in parts]), whole["x"])


@pytest.mark.unit
def test_a_bad_recipe_names_the_setting():
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        Recipe(micro_batch_size=0)
    with pytest.raises(ValueError, match="precision='fp16'"):
        Recipe(precision="fp16")
    with pytest.raises(ValueError, match="max_grad_norm=-1"):
        Recipe(max_grad_norm=-1)


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_micro_batches_keep_the_forward_size_through_a_shrink_and_the_gradient(parallelism):
    """16 samples a step, micro-batches of 2: 4 ranks run 2 forwards of 2 each, 2 ranks 4 of 2
    (a forward of more than 2 raises). Both train as the whole slices at once do on 2 ranks,
    within float tolerance (the accumulation only reorders the sums)."""
    args = {"max_forward": 2}
    four, l4 = run_world(4, parallelism, steps=4, task=CHECKED, task_args=args, gbs=16,
                         recipe={"micro_batch_size": 2})
    two, l2 = run_world(2, parallelism, steps=4, task=CHECKED, task_args=args, gbs=16,
                        recipe={"micro_batch_size": 2})
    whole, lw = run_world(2, parallelism, steps=4, task=MLP, gbs=16)
    _close(four, whole)
    _close(two, whole)
    assert l4 == pytest.approx(lw, rel=1e-5) and l2 == pytest.approx(lw, rel=1e-5)
    with pytest.raises(Exception):  # the check bites: whole slices of 8 are refused
        run_world(2, parallelism, steps=1, task=CHECKED, task_args=args, gbs=16)


@pytest.mark.e2e
def test_clipping_under_fsdp2_equals_clipping_under_ddp():
    """max_grad_norm by the global norm: FSDP2 clips its shards by the norm of the whole
    gradient, so it ends where DDP does; and the clip is active (unclipped differs)."""
    clip = {"max_grad_norm": 0.05}
    ddp, _ = run_world(2, "ddp", steps=4, task=MLP, gbs=16, recipe=clip)
    fsdp, _ = run_world(2, "fsdp", steps=4, task=MLP, gbs=16, recipe=clip)
    free, _ = run_world(2, "ddp", steps=4, task=MLP, gbs=16)
    _close(ddp, fsdp)
    assert _differs(ddp, free, atol=1e-4)


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_bf16_trains_near_fp32_and_keeps_fp32_master_weights(parallelism):
    """TinyGPT in bf16 compute: the weights stay fp32, the loss falls as fp32's does (within
    bf16's precision) and the run is not fp32's."""
    bf16, lb = run_world(2, parallelism, steps=6, gbs=8, recipe={"precision": "bf16"})
    fp32, lf = run_world(2, parallelism, steps=6, gbs=8)
    assert all(v.dtype == torch.float32 for v in bf16.values() if v.is_floating_point())
    assert lb[-1] < lb[0] and lb == pytest.approx(lf, rel=0.02)
    assert _differs(bf16, fp32, atol=0)


@pytest.mark.e2e
def test_a_replacement_keeps_a_micro_batched_bf16_clipped_run_bit_identical(tmp_path):
    """The coordinator on Ray, 4 workers, micro-batches of 2, bf16 and clipping: a SIGKILLed
    worker is replaced and the final weights equal the failure-free run's bit for bit; the
    gradient norm reaches the progress events; evaluations every 20 steps change nothing of
    training and reach the events, the summary, the progress line and the curves."""
    import os

    from conftest import ROOT, run_cli, run_events, run_summary
    from train.state import weights_digest

    recipe = {"micro_batch_size": 2, "precision": "bf16", "max_grad_norm": 0.5}
    run_dir = tmp_path / "run"
    proc = run_cli(["run", os.path.join(ROOT, "configs", "local_cpu.yaml"), "train.steps=60",
                    "train.global_batch_size=16", *(f"train.{k}={v}" for k, v in recipe.items()),
                    "checkpoint.interval_steps=0", f"run.dir={run_dir}",
                    "train.eval_interval_steps=20", "train.eval_samples=24",
                    # 60 steps take ~2 s: the default 5 s interval may see no progress at all
                    "run.log_interval_s=0.2",
                    "chaos.events=[{at_step: 20, action: kill_worker, target: 2}]"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["recoveries"] == 1 and s["world_sizes"] == [4, 4]
    state, _ = run_world(4, "ddp", steps=60, gbs=16, recipe=recipe)
    assert s["weights_digest"] == weights_digest(state)
    norms = [e["grad_norm"] for e in run_events(run_dir) if e["event"] == "progress"
             and e["grad_norm"] is not None]
    assert norms and all(n > 0 for n in norms) and "gnorm" in proc.stdout
    evals = {e["step"]: e for e in run_events(run_dir) if e["event"] == "eval"}
    # the one after step 20 may be lost with the worker killed there (not redone)
    assert {40, 60} <= set(evals) <= {20, 40, 60}, evals
    assert all(e["samples"] == 24 and e["world_size"] == 4 and e["eval_s"] > 0
               for e in evals.values())
    assert evals[60]["loss"] < evals[40]["loss"] and s["final_eval_loss"] == evals[60]["loss"]
    assert "| eval " in proc.stdout and f"eval loss {evals[60]['loss']:.4f}" in proc.stdout
    again = run_cli(["run", os.path.join(ROOT, "configs", "local_cpu.yaml"), "train.steps=60",
                     f"run.dir={run_dir}", "checkpoint.interval_steps=0"], timeout=60)
    assert again.returncode == 0 and "summary.json says 60/60 steps" in again.stdout, again.stdout
    # ... and the TensorBoard curves, once per step, increasing, through the recovery
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "job/world_size", "job/failures",
            "recovery/recovery_s", "eval/loss", "perf/goodput"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/loss")] == sorted(evals)
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert all(0 < x <= 3.0001e-3 for x in lrs) and max(lrs) > 5 * lrs[-1]  # warm-up, then cosine to 10%
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 60


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_the_eval_loss_is_the_same_at_world_1_2_and_4(parallelism):
    """22 held-out samples (unequal slices at 4: FSDP2's spare pass) in passes of 2: the same
    mean at any world size, and it falls as the model trains."""
    out = {}
    for world in (1, 2, 4):
        evals = []
        run_world(world, parallelism, steps=4, gbs=12, recipe={"micro_batch_size": 2},
                  evaluate=(2, 22), evals=evals)
        out[world] = evals
    assert len(out[1]) == 2 and out[1][1] < out[1][0]
    assert out[2] == pytest.approx(out[1], rel=1e-5) and out[4] == pytest.approx(out[1], rel=1e-5)


@pytest.mark.e2e
def test_an_evaluation_after_every_step_leaves_training_as_it_was():
    evals = []
    with_eval, losses = run_world(2, "ddp", steps=4, gbs=12, evaluate=(1, 10), evals=evals)
    without, losses0 = run_world(2, "ddp", steps=4, gbs=12)
    assert len(evals) == 4 and losses == losses0
    assert all(torch.equal(with_eval[k], without[k]) for k in without)
