"""Recovery from a lost worker: ours vs torchft vs Ray Train V2, the same job, in one run.

The same job on every side: 4 CPU workers, the built-in TinyGPT, global batch 16, seed 0, and
worker (or replica group) 1 SIGKILLed after step 100; where a side checkpoints, every 20 steps.

  recovery_s  from the kill to the next step completed by the job (the survivors)
  lost_steps  steps completed before the kill that had to be trained again
  phases      ours: where the time went (the `recovered` event; control/recovery_profile.py)

Ours runs in three modes: the defaults (a spare worker, started ahead where the cluster has room,
takes the vacant rank: bit-identical), `scaling.spare_workers=0` (a replacement process starts
and takes the rank), and `failure.replace=false` with no spare (the survivors re-form at once and
grow back later). torchft (scripts/torchft_replica.py) runs 4 replica groups of one worker with
its Lighthouse on 127.0.0.1 and restarts the killed group at once, as torchrun would; `rejoin_s`
is the kill to the restarted group's first step. Ray Train restarts every worker and resumes from
its last reported checkpoint. Every side runs `--repeats` times, interleaved; figures are medians
with their spread, and each ratio sits next to its goal.

    python scripts/bench_recovery.py --json      (needs `pip install -e ".[bench]"`)

`--parallelism fsdp`: the same job sharded with FSDP2, ours with in-memory snapshots every step
(`ours_memory`, the default: the lost shard comes from its buddy's copy) against ours with
checkpoints only (`ours_checkpoint_only`: the lost shard comes from the last checkpoint, the
steps since it are trained again) and Ray Train's restart-all; `release_s` (detection to every
survivor out of the failed group) beside each of ours. Ray Train's side is the DDP job of the
default run: its restart-all recovery does not depend on how the model is split.
`--parallelism hsdp`: the same with HSDP, 2 shard groups of 2: the lost shard comes from its
replica in the other group (no buddy copies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchlib  # noqa: E402

WORKERS, GBS, INTERVAL, KILL_AT, STEPS = 4, 16, 20, 100, 160
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
            "phases": get_field(rec, Event.RECOVERED, "phases"),
            "lost_steps": get_field(rec, Event.RECOVERED, "lost_steps"),
            "killed_at_step": get_field(kill, Event.CHAOS, "step"),
            "world_size_after": get_field(rec, Event.RECOVERED, "world_size"),
            "source": get_field(rec, Event.RECOVERED, "source"),
            "release_s": get_field(rec, Event.RECOVERED, "release_s"),
            "transfer_bytes": get_field(rec, Event.RECOVERED, "transfer_bytes")}


def _ray_train_loop(config):
    import signal

    import torch
    import ray.train
    import ray.train.torch

    from train.loop import run_steps
    from train.state import TrainState
    from train.task import make_task

    from coordinator.procmem import peak_rss_bytes

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    job = config["job"]
    task = make_task(TASK, job["task_args"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(task.build_model())
    inner = model.module if hasattr(model, "module") else model
    opt = task.build_optimizer(inner)
    sched = task.build_scheduler(opt, job["steps"])
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
                                "start": start, "pid": os.getpid(),
                                "peak_rss": peak_rss_bytes()}) + "\n")
        if done % job["interval"] == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": inner.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict() if sched is not None else {},
                                "step": done}, os.path.join(d, "state.pt"))
                ray.train.report({"step": done},
                                 checkpoint=ray.train.Checkpoint.from_directory(d)
                                 if rank == 0 else None)
        if done == job["kill_at"] and rank == 1 and not os.path.exists(config["marker"]):
            with open(config["marker"], "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    # Our rank loop, with Ray Train's model preparation, checkpoints and reports in its hook.
    state = TrainState(task, model, opt, sched, step=start)
    run_steps(state, seed=0, global_batch_size=job["gbs"], world_size=world, rank=rank,
              device=torch.device("cpu"), until_step=job["steps"], after_step=after_step)


def ray_train(tmp: str, job: Optional[dict] = None) -> dict:
    """Ray Train V2's TorchTrainer on the job (`job`: task_args, steps, kill_at, gbs, interval;
    default: this benchmark's)."""
    job = dict({"task_args": {}, "steps": STEPS, "kill_at": KILL_AT, "gbs": GBS,
                "interval": INTERVAL}, **(job or {}))
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    log, marker = os.path.join(tmp, "steps.jsonl"), os.path.join(tmp, "killed")
    ray.init(num_cpus=WORKERS + 1, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "RAY_TRAIN_V2_ENABLED": "1"}})
    try:
        trainer = TorchTrainer(
            _ray_train_loop, train_loop_config={"log": log, "marker": marker, "job": job},
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
    rss = {}
    for r in rows:
        if r.get("peak_rss"):
            rss[r["pid"]] = max(rss.get(r["pid"], 0), r["peak_rss"])
    return {"recovery_s": round(first["t"] - t_kill, 3), "lost_steps": before - first["start"],
            "killed_at_step": before, "resumed_step": first["start"],
            "peak_rss_gb": sorted(round(b / 1e9, 3) for b in rss.values())}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lighthouse:
    """torchft's Lighthouse on 127.0.0.1, with the settings of its train_ddp.py example."""

    def __init__(self, log_path: str):
        self.addr = f"127.0.0.1:{_free_port()}"
        binary = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--min_replicas", "1", "--quorum_tick_ms", "100",
             "--join_timeout_ms", "10000", "--bind", self.addr],
            stdout=self.log, stderr=subprocess.STDOUT)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()


def torchft_job(tmp: str, kill_at: int = 0, steps: int = STEPS, timeout_s: float = 600,
                workers: int = WORKERS, gbs: int = GBS, task_args: Optional[dict] = None) -> list:
    """`workers` torchft replica groups of one worker (scripts/torchft_replica.py); with `kill_at`,
    replica 1 is SIGKILLed after that step and restarted at once, as torchrun would. Returns the
    committed-step rows of every replica."""
    os.makedirs(tmp, exist_ok=True)
    log = os.path.join(tmp, "steps.jsonl")
    lighthouse = Lighthouse(os.path.join(tmp, "lighthouse.log"))
    env = dict(os.environ, PYTHONPATH=ROOT)

    def start(replica: int) -> subprocess.Popen:
        out = open(os.path.join(tmp, f"replica{replica}.log"), "a")
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "torchft_replica.py"),
             "--replica", str(replica), "--replicas", str(workers), "--lighthouse",
             lighthouse.addr, "--steps", str(steps), "--global-batch-size", str(gbs),
             "--task", TASK, "--task-args", json.dumps(task_args or {}), "--log", log,
             "--kill-at", str(kill_at)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    procs = {r: start(r) for r in range(workers)}
    deadline = time.time() + timeout_s
    try:
        while procs and time.time() < deadline:
            for r, proc in list(procs.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                if rc == -9 and kill_at and os.path.exists(log + ".killed") \
                        and not os.path.exists(log + ".restarted"):
                    open(log + ".restarted", "w").close()
                    procs[r] = start(r)
                elif rc != 0:
                    raise RuntimeError(f"torchft replica {r} exited with {rc}: see "
                                       f"{tmp}/replica{r}.log")
                else:
                    del procs[r]
            time.sleep(0.01)
        if procs:
            raise RuntimeError(f"torchft replicas {sorted(procs)} still running after "
                               f"{timeout_s:.0f}s")
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=10)
        lighthouse.close()
    with open(log) as f:
        return [json.loads(line) for line in f]


def torchft(tmp: str) -> dict:
    """torchft's recovery from the same kill: to the survivors' next step, and to the restarted
    replica group healed from a peer and training."""
    rows = torchft_job(tmp, kill_at=KILL_AT)
    with open(os.path.join(tmp, "steps.jsonl.killed")) as f:
        t_kill = float(f.read())
    killed_pid = {r["pid"] for r in rows if r["replica"] == 1 and r["step"] == KILL_AT}
    # The survivors may log step KILL_AT just after the kill (they commit it with the killed one)
    after = [r for r in rows if r["t"] > t_kill and r["replica"] != 1 and r["step"] > KILL_AT]
    first = min(after, key=lambda r: r["t"])
    # a survivor that commits a step it had committed before would have lost steps
    seen, lost = {}, 0
    for r in sorted(rows, key=lambda r: r["t"]):
        if r["replica"] != 1:
            lost = max(lost, seen.get(r["replica"], 0) + 1 - r["step"])
            seen[r["replica"]] = max(seen.get(r["replica"], 0), r["step"])
    back = [r for r in rows if r["replica"] == 1 and r["pid"] not in killed_pid]
    healed = min(back, key=lambda r: r["t"]) if back else None
    return {"recovery_s": round(first["t"] - t_kill, 3),
            "rejoin_s": round(healed["t"] - t_kill, 3) if healed else None,
            "lost_steps": lost,
            "killed_at_step": KILL_AT, "rejoined_at_step": healed["step"] if healed else None,
            "config": "ProcessGroupGloo(timeout=5s), Manager(min_replica_size=1, timeout=10s), "
                      "lighthouse --min_replicas 1 --quorum_tick_ms 100 --join_timeout_ms 10000"}


MODES = {  # ours: mode -> overrides
    "ours": [],
    "ours_no_spare": ["scaling.spare_workers=0"],
    "ours_shrink_first": ["scaling.spare_workers=0", "failure.replace=false"],
}
SHARDED = {  # --parallelism -> the overrides that select it
    "fsdp": ["train.parallelism=fsdp"],
    "hsdp": ["train.parallelism=hsdp", "train.shard_group_size=2"],  # 2 shard groups of 2
}


def sharded_modes(parallelism: str) -> dict:
    """ours with in-memory snapshots (the default) and with checkpoints only."""
    base = SHARDED[parallelism]
    return {"ours_memory": base,
            "ours_checkpoint_only": base + ["checkpoint.memory_interval_steps=0"]}


def ray_train_subprocess(tmp: str) -> dict:
    """Ray Train in a process of its own (its own Ray instance, its env)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ray-train-only", tmp],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"the Ray Train run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list, errors: list) -> dict:
    """One side's repeated runs: recovery_s (and rejoin_s) as median and spread, the worst
    lost_steps, and every run; a side that could not be measured says why."""
    if not runs:
        return {"recovery_s": None, "error": errors[0] if errors else "not run"}
    out = {"recovery_s": benchlib.figure([r["recovery_s"] for r in runs]),
           "lost_steps_max": max(r["lost_steps"] for r in runs), "runs": runs}
    rejoin = [r["rejoin_s"] for r in runs if r.get("rejoin_s") is not None]
    if rejoin:
        out["rejoin_s"] = benchlib.figure(rejoin)
    if runs and "phases" in runs[0] and runs[0]["phases"]:
        out["phases_median"] = {k: round(statistics.median(r["phases"][k] for r in runs), 3)
                                for k in runs[0]["phases"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of every side")
    ap.add_argument("--ray-train-only", metavar="DIR",
                    help="run only the Ray Train side, keeping its files in DIR")
    ap.add_argument("--torchft-only", metavar="DIR",
                    help="run only the torchft side, keeping its files in DIR")
    ap.add_argument("--parallelism", choices=["ddp", "fsdp", "hsdp"], default="ddp")
    # the job of --ray-train-only (scripts/bench_scale.py runs it at other sizes)
    ap.add_argument("--task-args", default="{}", help="the task's arguments, as JSON")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--kill-at", type=int, default=KILL_AT)
    ap.add_argument("--global-batch-size", type=int, default=GBS)
    ap.add_argument("--interval", type=int, default=INTERVAL)
    args = ap.parse_args()
    if args.parallelism in SHARDED:
        return sharded_main(args)
    if args.ray_train_only:
        os.makedirs(args.ray_train_only, exist_ok=True)
        print(json.dumps(ray_train(args.ray_train_only, {
            "task_args": json.loads(args.task_args), "steps": args.steps,
            "kill_at": args.kill_at, "gbs": args.global_batch_size,
            "interval": args.interval})))
        return
    if args.torchft_only:
        print(json.dumps(torchft(args.torchft_only)))
        return
    runs = {name: [] for name in list(MODES) + ["torchft", "ray_train"]}
    errors = {name: [] for name in runs}
    peers = {"torchft": torchft, "ray_train": ray_train_subprocess}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in MODES.items():
                print(f"[{i + 1}/{args.repeats}] {name} {' '.join(extra)}...", file=sys.stderr)
                runs[name].append(ours(os.path.join(tmp, f"{name}{i}"), *extra))
            for name, measure in peers.items():
                print(f"[{i + 1}/{args.repeats}] {name}...", file=sys.stderr)
                try:  # a peer that cannot be measured here is said so in the JSON, with why
                    runs[name].append(measure(os.path.join(tmp, f"{name}{i}")))
                except Exception as e:
                    errors[name].append(f"{type(e).__name__}: {str(e)[-500:]}")
                    print(f"  {name} failed: {errors[name][-1]}", file=sys.stderr)
    sides = {name: summarize(rs, errors[name]) for name, rs in runs.items()}
    med = {name: side["recovery_s"]["median"] if side["recovery_s"] else None
           for name, side in sides.items()}
    ratio = {f"{name}_vs_{peer}": round(med[name] / med[peer], 3) if med[peer] else None
             for name in MODES for peer in peers}
    result = {
        "benchmark": "recovery", "machine": benchlib.machine("torchft"),
        "repeats": args.repeats, "sides": sides, "ratios": ratio,
        "goals": {
            "ours_vs_torchft": benchlib.goal(ratio["ours_vs_torchft"], "<=", 0.5),
            "ours_recovery_s": benchlib.goal(med["ours"], "<=", 1.0),
            "ours_lost_steps": benchlib.goal(sides["ours"]["lost_steps_max"], "<=", 0),
        },
        "job": {"workers": WORKERS, "global_batch_size": GBS, "task": TASK, "seed": 0,
                "checkpoint_interval": INTERVAL, "kill_after_step": KILL_AT, "steps": STEPS}}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


def sharded_main(args) -> None:
    modes = sharded_modes(args.parallelism)
    runs = {name: [] for name in list(modes) + ["ray_train"]}
    errors = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, extra in modes.items():
                print(f"[{i + 1}/{args.repeats}] {name} {' '.join(extra)}...", file=sys.stderr)
                runs[name].append(ours(os.path.join(tmp, f"{name}{i}"), *extra))
            print(f"[{i + 1}/{args.repeats}] ray_train...", file=sys.stderr)
            try:
                runs["ray_train"].append(ray_train_subprocess(os.path.join(tmp, f"rt{i}")))
            except Exception as e:
                errors["ray_train"].append(f"{type(e).__name__}: {str(e)[-500:]}")
    sides = {name: summarize(rs, errors[name]) for name, rs in runs.items()}
    for name in modes:
        rel = [r["release_s"] for r in runs[name] if r.get("release_s") is not None]
        sides[name]["release_s"] = benchlib.figure(rel) if rel else None
    med = {name: side["recovery_s"]["median"] if side["recovery_s"] else None
           for name, side in sides.items()}
    ratio = {f"ours_memory_vs_{other}": round(med["ours_memory"] / med[other], 3)
             if med[other] else None for other in ("ours_checkpoint_only", "ray_train")}
    result = {
        "benchmark": "recovery", "parallelism": args.parallelism, "machine": benchlib.machine(),
        "repeats": args.repeats, "sides": sides, "ratios": ratio,
        "goals": {
            "ours_memory_lost_steps": benchlib.goal(sides["ours_memory"]["lost_steps_max"],
                                                    "<=", 1),
            "ours_memory_release_s": benchlib.goal(
                sides["ours_memory"]["release_s"]["median"]
                if sides["ours_memory"]["release_s"] else None, "<=", 1.0),
        },
        "job": {"workers": WORKERS, "global_batch_size": GBS, "task": TASK, "seed": 0,
                "checkpoint_interval": INTERVAL, "kill_after_step": KILL_AT, "steps": STEPS,
                "memory_interval_steps": 1, "overrides": SHARDED[args.parallelism]}}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
