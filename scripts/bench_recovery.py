"""Recovery from a lost worker: our coordinator vs Ray Train V2's TorchTrainer, in one run.

The same job on both sides: 4 CPU workers, the built-in TinyGPT, global batch 16, a checkpoint
every 20 steps, and worker rank 1 SIGKILLed at step 30.

  recovery_s  from the kill to the next completed training step
  lost_steps  steps trained before the kill that had to be trained again

Ours is measured three times: with the defaults (`failure.replace=true`: a replacement is
started and takes the vacant rank, so the run stays bit-identical), with `failure.replace=false`
(the survivors re-form at once; the job grows back when the replacement is ready), and with
`scaling.spare_workers=1` (a worker started ahead takes the vacant rank: bit-identical and fast;
it occupies the fifth CPU, which Ray Train's run also has). Ray Train restarts every worker and
resumes from the last reported checkpoint. `recovery_ratio*` are ours / Ray Train's.

    python scripts/bench_recovery.py --json      (needs `pip install -e ".[bench]"`)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORKERS, GBS, INTERVAL, KILL_AT, STEPS = 4, 16, 20, 30, 80
TASK = "train.tasks.gpt:TinyGPT"


def ours(run_dir: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "run", "configs/local_cpu.yaml",
         "ray.simulated_nodes=0", "scaling.min_workers=2", f"scaling.max_workers={WORKERS}",
         f"train.steps={STEPS}", f"train.global_batch_size={GBS}", f"train.task={TASK}",
         f"checkpoint.interval_steps={INTERVAL}", f"run.dir={run_dir}",
         f"chaos.events=[{{at_step: {KILL_AT}, action: kill_worker, target: 1}}]", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"our run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from coordinator.events import Event, events_of, get_field

    path = os.path.join(run_dir, "events.jsonl")
    kill = events_of(path, Event.CHAOS)[0]
    detected = events_of(path, Event.FAILURE_DETECTED)[0]
    rec = events_of(path, Event.RECOVERED)[0]
    # recovery_s: detection -> first step
    next_step_t = detected["t"] + get_field(rec, Event.RECOVERED, "recovery_s")
    return {"recovery_s": round(next_step_t - kill["t"], 3),
            "detect_s": round(detected["t"] - kill["t"], 3),
            "lost_steps": get_field(rec, Event.RECOVERED, "lost_steps"),
            "killed_at_step": get_field(kill, Event.CHAOS, "step"),
            "world_size_after": get_field(rec, Event.RECOVERED, "world_size"),
            "source": get_field(rec, Event.RECOVERED, "source")}


def _ray_train_loop(config):
    import signal

    import torch
    import ray.train
    import ray.train.torch

    from train.loop import run_steps
    from train.state import TrainState
    from train.task import make_task

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    task = make_task(TASK, {})
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(task.build_model())
    inner = model.module if hasattr(model, "module") else model
    opt = task.build_optimizer(inner)
    sched = task.build_scheduler(opt, STEPS)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            sd = torch.load(os.path.join(d, "state.pt"), weights_only=True)
        inner.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        if sched is not None:
            sched.load_state_dict(sd["sched"])
        start = int(sd["step"])
    log = config["log"]

    def after_step(done, weighted_loss, t, duration):
        with open(log, "a") as f:
            f.write(json.dumps({"rank": rank, "step": done, "t": time.time(),
                                "start": start, "pid": os.getpid()}) + "\n")
        if done % INTERVAL == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": inner.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict() if sched is not None else {},
                                "step": done}, os.path.join(d, "state.pt"))
                ray.train.report({"step": done},
                                 checkpoint=ray.train.Checkpoint.from_directory(d)
                                 if rank == 0 else None)
        if done == KILL_AT and rank == 1 and not os.path.exists(config["marker"]):
            with open(config["marker"], "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    # Our rank loop, with Ray Train's model preparation, checkpoints and reports in its hook.
    state = TrainState(task, model, opt, sched, step=start)
    run_steps(state, seed=0, global_batch_size=GBS, world_size=world, rank=rank,
              device=torch.device("cpu"), until_step=STEPS, after_step=after_step)


def ray_train(tmp: str) -> dict:
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log, marker = os.path.join(tmp, "steps.jsonl"), os.path.join(tmp, "killed")
    ray.init(num_cpus=WORKERS + 1, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_TRAIN_V2_ENABLED": "1"}})
    try:
        trainer = TorchTrainer(
            _ray_train_loop, train_loop_config={"log": log, "marker": marker},
            scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="bench_recovery", storage_path=os.path.join(tmp, "rt"),
                                 failure_config=FailureConfig(max_failures=2)))
        trainer.fit()
    finally:
        ray.shutdown()
    with open(marker) as f:
        t_kill = float(f.read())
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    before = max(r["step"] for r in rows if r["t"] <= t_kill)
    # Ray Train restarts every worker: the new attempt's rows come from new processes (the old
    # survivors may still log the step they finished as rank 1 died).
    old = {r["pid"] for r in rows if r["t"] <= t_kill}
    first = min((r for r in rows if r["pid"] not in old), key=lambda r: r["t"])
    return {"recovery_s": round(first["t"] - t_kill, 3), "lost_steps": before - first["start"],
            "killed_at_step": before, "resumed_step": first["start"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--ray-train-only", metavar="DIR",
                    help="run only the Ray Train side, keeping its files in DIR")
    args = ap.parse_args()
    if args.ray_train_only:
        os.makedirs(args.ray_train_only, exist_ok=True)
        print(json.dumps(ray_train(args.ray_train_only)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print("ours (defaults: replacement in the vacant rank)...", file=sys.stderr)
        a = ours(os.path.join(tmp, "ours"))
        print("ours (failure.replace=false: survivors re-form at once)...", file=sys.stderr)
        b = ours(os.path.join(tmp, "ours_shrink"), "failure.replace=false")
        print("ours (scaling.spare_workers=1: a started spare takes the rank)...", file=sys.stderr)
        c = ours(os.path.join(tmp, "ours_spare"), "scaling.spare_workers=1")
        print("Ray Train V2 TorchTrainer...", file=sys.stderr)
        rt = ray_train(tmp)
    result = {"ours": a, "ours_shrink_first": b, "ours_spare": c, "ray_train": rt,
              "recovery_ratio": round(a["recovery_s"] / rt["recovery_s"], 3),
              "recovery_ratio_shrink_first": round(b["recovery_s"] / rt["recovery_s"], 3),
              "recovery_ratio_spare": round(c["recovery_s"] / rt["recovery_s"], 3),
              "job": {"workers": WORKERS, "global_batch_size": GBS, "task": TASK,
                      "checkpoint_interval": INTERVAL, "kill_at_step": KILL_AT}}
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
