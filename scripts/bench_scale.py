"""The same job at three state sizes: memory, recovery and speed, ours against plain torch,
torchft and Ray Train, in one run.

The job: 4 CPU workers, the built-in GPT at three sizes (a flag picks them), global batch 4, seed
0, worker (or replica group) 1 SIGKILLed after a step ~20 s into training (so a spare is up, as it
is in a job of any length); where a side checkpoints, every INTERVAL steps. A training state is
the weights and AdamW's two moments: 12 bytes a parameter.

  size     GPT (dim, layers)   parameters   state per replica   kill after step / steps
  10MB     256, 1              0.9M         ~11 MB              60 / 72
  150MB    512, 4              12.9M        ~155 MB             20 / 30
  1.2GB    1024, 8             101M         ~1.2 GB             8 / 16

Per size and side:
  peak_rss_gb      per worker, from /proc/<pid>/status VmHWM (ours: each worker reports its own;
                   the baselines read theirs at the end); `bound_gb` is plain torch's + one copy
                   of the training state, the goal
  recovery_s       the kill to the next step completed by the job, with ours' `phases`
  transfer_gbps    ours: the bytes the newcomer took from its peers / the transfer's seconds,
                   beside `raw_gloo_gbps`: one plain gloo send of as many bytes between two
                   processes here
  stall_s          ours: the median checkpoint stall (the training thread's wait for a save)
  steps_per_s      against plain torch's (the same loop: train.loop.run_steps, same data)
  false_hangs      hang detections in a run where nothing hung (must be 0)

Ours runs with DDP (defaults: a spare takes the vacant rank), FSDP2 (in-memory snapshots), and
HSDP (2 shard groups of 2) at the largest size. Plain torch runs DDP (torch's defaults) and FSDP2
(fully_shard), without failures. A side that cannot run says why in the JSON.

    python scripts/bench_scale.py --json                  (all three sizes, every side)
    python scripts/bench_scale.py --size 1.2GB --sides ours,torch --json
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
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchlib  # noqa: E402

WORKERS, GBS, INTERVAL = 4, 4, 5
TASK = "train.tasks.gpt:TinyGPT"
SIZES = {  # name -> the task's arguments
    "10MB": {"dim": 256, "layers": 1, "heads": 4, "seq_len": 8, "vocab_size": 256},
    "150MB": {"dim": 512, "layers": 4, "heads": 8, "seq_len": 8, "vocab_size": 256},
    "1.2GB": {"dim": 1024, "layers": 8, "heads": 8, "seq_len": 8, "vocab_size": 256},
}
OURS = {  # side -> overrides
    "ours_ddp": [],
    "ours_fsdp": ["train.parallelism=fsdp"],
    "ours_hsdp": ["train.parallelism=hsdp", "train.shard_group_size=2"],
}
RUNS = {"10MB": (60, 72), "150MB": (20, 30), "1.2GB": (8, 16)}  # (kill after step, steps)
SIDES = list(OURS) + ["torch_ddp", "torch_fsdp", "torchft", "ray_train", "raw_gloo"]
GB = 1e9


def _task_args(size: str) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in SIZES[size].items()) + "}"


def state_bytes(size: str) -> int:
    from train.task import make_task

    model = make_task(TASK, SIZES[size]).build_model()
    return 12 * sum(p.numel() for p in model.parameters())


# ---- ours ---------------------------------------------------------------------------------------

def ours(size: str, run_dir: str, extra) -> dict:
    kill_at, steps = RUNS[size]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "run", "configs/local_cpu.yaml",
         "ray.simulated_nodes=0", "scaling.min_workers=2", f"scaling.max_workers={WORKERS}",
         f"train.steps={steps}", f"train.global_batch_size={GBS}", f"train.task={TASK}",
         f"train.task_args={_task_args(size)}", f"checkpoint.interval_steps={INTERVAL}",
         f"run.dir={run_dir}",
         f"chaos.events=[{{at_step: {kill_at}, action: kill_worker, target: 1}}]", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"our run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    from coordinator.events import Event, events_of, get_field

    path = os.path.join(run_dir, "events.jsonl")
    kill = events_of(path, Event.CHAOS)[0]
    failures = events_of(path, Event.FAILURE_DETECTED)
    rec = events_of(path, Event.RECOVERED)[0]
    next_step_t = failures[0]["t"] + get_field(rec, Event.RECOVERED, "recovery_s")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    stalls = [e["stall_s"] for e in events_of(path, Event.CHECKPOINT_COMMITTED)]
    moved, transfer_s = rec.get("transfer_bytes") or 0, rec["phases"].get("transfer_s") or 0
    return {"recovery_s": round(next_step_t - kill["t"], 3),
            "phases": rec["phases"], "source": rec["source"], "lost_steps": rec["lost_steps"],
            "transfer_bytes": moved,
            "transfer_gbps": round(moved / transfer_s / GB, 3) if moved and transfer_s else None,
            "peak_rss_gb": sorted(round(mb * 2**20 / GB, 3)
                                  for mb in summary["peak_rss_mb"].values()),
            "stall_s": round(statistics.median(stalls), 4) if stalls else None,
            "steps_per_s": summary["steps_per_s"], "status": summary["status"],
            "false_hangs": sum(1 for e in failures if e["kind"] == "hang"),
            "failures": [e["kind"] for e in failures]}


# ---- plain torch ------------------------------------------------------------------------------

def _torch_rank(rank, world, port, out, size, parallelism, steps):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from coordinator.procmem import peak_rss_bytes
    from train.loop import run_steps
    from train.parallel import wrap
    from train.state import TrainState
    from train.task import make_task

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    task = make_task(TASK, SIZES[size])
    torch.manual_seed(0)
    model = task.build_model()
    # torch's own defaults: DDP as torch wraps it; FSDP2's fully_shard as train.parallel does
    model = DistributedDataParallel(model) if parallelism == "ddp" else \
        wrap(model, "fsdp", torch.device("cpu"), task)
    inner = model.module if parallelism == "ddp" else model
    opt = task.build_optimizer(inner)
    st = TrainState(task, model, opt, task.build_scheduler(opt, steps))
    loop = dict(seed=0, global_batch_size=GBS, world_size=world, rank=rank,
                device=torch.device("cpu"))
    run_steps(st, until_step=2, **loop)
    t0 = time.time()
    run_steps(st, until_step=steps, **loop)
    rate = (steps - 2) / (time.time() - t0)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"steps_per_s": rate, "peak_rss": peak_rss_bytes()}, f)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(fn, world, args):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    ctx = mp.start_processes(fn, args=(world, store.port, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 1200
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes did not finish in 1200s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def plain_torch(size: str, tmp: str, parallelism: str) -> dict:
    out = os.path.join(tmp, f"torch_{parallelism}")
    _spawn(_torch_rank, WORKERS, (out, size, parallelism, RUNS[size][1]))
    rows = []
    for r in range(WORKERS):
        with open(f"{out}.{r}") as f:
            rows.append(json.load(f))
    return {"steps_per_s": round(min(r["steps_per_s"] for r in rows), 4),
            "peak_rss_gb": sorted(round(r["peak_rss"] / GB, 3) for r in rows)}


def _gloo_rank(rank, world, port, out, nbytes):
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    buf = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else \
        torch.empty(nbytes, dtype=torch.uint8)
    warm = buf[:1 << 20]
    (dist.send if rank == 0 else dist.recv)(warm, 1 - rank)
    times = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        (dist.send if rank == 0 else dist.recv)(buf, 1 - rank)
        times.append(time.perf_counter() - t0)
    if rank == 1:
        with open(out, "w") as f:
            json.dump({"seconds": statistics.median(times)}, f)
    dist.barrier()
    dist.destroy_process_group()


def raw_gloo(size: str, tmp: str) -> dict:
    nbytes = state_bytes(size)
    out = os.path.join(tmp, "gloo.json")
    _spawn(_gloo_rank, 2, (out, nbytes))
    with open(out) as f:
        s = json.load(f)["seconds"]
    return {"bytes": nbytes, "seconds": round(s, 3), "gbps": round(nbytes / s / GB, 3)}


# ---- the peers ----------------------------------------------------------------------------------

def torchft(size: str, tmp: str) -> dict:
    import bench_recovery as br

    kill_at, steps = RUNS[size]
    rows = br.torchft_job(tmp, kill_at=kill_at, steps=steps, gbs=GBS,
                          task_args=SIZES[size], timeout_s=1200)
    with open(os.path.join(tmp, "steps.jsonl.killed")) as f:
        t_kill = float(f.read())
    after = [r for r in rows if r["t"] > t_kill and r["replica"] != 1 and r["step"] > kill_at]
    first = min(after, key=lambda r: r["t"])
    rss = {}
    for r in rows:
        if r.get("peak_rss"):
            rss[r["pid"]] = max(rss.get(r["pid"], 0), r["peak_rss"])
    return {"recovery_s": round(first["t"] - t_kill, 3),
            "peak_rss_gb": sorted(round(b / GB, 3) for b in rss.values())}


def ray_train(size: str, tmp: str) -> dict:
    kill_at, steps = RUNS[size]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_recovery.py"), "--ray-train-only",
         tmp, "--task-args", json.dumps(SIZES[size]), "--steps", str(steps), "--kill-at",
         str(kill_at), "--global-batch-size", str(GBS), "--interval", str(INTERVAL)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"the Ray Train run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the run ----------------------------------------------------------------------------------

def run_side(side: str, size: str, tmp: str) -> dict:
    d = os.path.join(tmp, f"{side}_{size}")
    os.makedirs(d, exist_ok=True)
    if side in OURS:
        return ours(size, os.path.join(d, "run"), OURS[side])
    if side in ("torch_ddp", "torch_fsdp"):
        return plain_torch(size, d, side.split("_")[1])
    if side == "torchft":
        return torchft(size, d)
    if side == "ray_train":
        return ray_train(size, d)
    if side == "raw_gloo":
        return raw_gloo(size, d)
    raise ValueError(side)


def goals(size: str, res: dict, state: int) -> dict:
    """The issue's goals at this size, each beside its figure."""
    def get(side, key):
        return (res.get(side) or {}).get(key)

    out = {}
    for ours_side, base in (("ours_ddp", "torch_ddp"), ("ours_fsdp", "torch_fsdp")):
        rss, plain = get(ours_side, "peak_rss_gb"), get(base, "peak_rss_gb")
        if rss and plain:
            copy = state / GB if ours_side == "ours_ddp" else state / GB / WORKERS * 2
            bound = max(plain) + copy
            out[f"{ours_side}_peak_rss_within_bound"] = dict(
                benchlib.goal(round(max(rss), 3), "<=", round(bound, 3)),
                bound_gb=round(bound, 3), plain_gb=max(plain))
    rec, ft = get("ours_ddp", "recovery_s"), get("torchft", "recovery_s")
    out["ours_ddp_vs_torchft"] = benchlib.goal(round(rec / ft, 3) if rec and ft else None,
                                               "<=", 0.5)
    rate, plain_rate = get("ours_ddp", "steps_per_s"), get("torch_ddp", "steps_per_s")
    if rec and plain_rate:
        out["ours_ddp_recovery_within_a_step_plus_1.5s"] = dict(
            benchlib.goal(rec, "<=", round(1 / plain_rate + 1.5, 3)))
    tr, raw = get("ours_ddp", "transfer_gbps"), get("raw_gloo", "gbps")
    out["transfer_vs_raw_gloo"] = benchlib.goal(round(tr / raw, 3) if tr and raw else None,
                                                ">=", 0.7)
    if rate and plain_rate:
        out["ours_ddp_steps_per_s_vs_torch"] = {"value": round(rate / plain_rate, 3)}
    hangs = sum(get(s, "false_hangs") or 0 for s in OURS)
    out["false_hangs"] = benchlib.goal(hangs, "<=", 0)
    return out


def plot(result: dict, path: str) -> None:
    """Recovery seconds and peak memory per worker against the state size, ours and the peers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["sizes"])
    gb = [result["sizes"][s]["state_bytes"] / GB for s in sizes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"ours_ddp": ("ours (DDP)", "o-"), "ours_fsdp": ("ours (FSDP2)", "s-"),
              "torchft": ("torchft", "^--"), "ray_train": ("Ray Train V2", "v--"),
              "torch_ddp": ("plain torch DDP", "x:"), "torch_fsdp": ("plain torch FSDP2", "+:")}
    for side, (label, style) in styles.items():
        rec = [(g, result["sizes"][s]["sides"].get(side, {}).get("recovery_s"))
               for g, s in zip(gb, sizes)]
        rec = [(g, v) for g, v in rec if v is not None]
        if rec:
            ax1.plot(*zip(*rec), style, label=label)
        rss = [(g, max(result["sizes"][s]["sides"].get(side, {}).get("peak_rss_gb") or [0]))
               for g, s in zip(gb, sizes)]
        rss = [(g, v) for g, v in rss if v]
        if rss:
            ax2.plot(*zip(*rss), style, label=label)
    bound = [(g, result["sizes"][s]["goals"].get("ours_ddp_peak_rss_within_bound", {})
              .get("bound_gb")) for g, s in zip(gb, sizes)]
    bound = [(g, v) for g, v in bound if v]
    if bound:
        ax2.plot(*zip(*bound), "k-", lw=0.8, alpha=0.5, label="bound: plain DDP + one state copy")
    for ax, title, unit in ((ax1, "kill -> next step", "seconds"),
                            (ax2, "peak RSS per worker", "GB")):
        ax.set_xscale("log")
        ax.set_xlabel("training state per replica (GB)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle("4 CPU workers, the built-in GPT at three sizes, worker 1 killed mid-run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--size", action="append", choices=list(SIZES),
                    help="a state size (repeatable; default: all three)")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated, of: {', '.join(SIDES)}")
    ap.add_argument("--plot", metavar="PNG", help="also draw the picture to this file")
    args = ap.parse_args()
    sizes = args.size or list(SIZES)
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    result = {"benchmark": "scale", "machine": benchlib.machine("torchft"),
              "job": {"workers": WORKERS, "global_batch_size": GBS, "task": TASK, "seed": 0,
                      "checkpoint_interval": INTERVAL,
                      "kill_after_step_and_steps": RUNS},
              "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            state = state_bytes(size)
            res = {}
            for side in sides:
                if side == "ours_hsdp" and size != list(SIZES)[-1]:
                    continue  # HSDP at the largest size only
                print(f"[{size}] {side}...", file=sys.stderr, flush=True)
                t0 = time.time()
                try:
                    res[side] = run_side(side, size, tmp)
                except Exception as e:  # a side that cannot run says why
                    res[side] = {"error": f"{type(e).__name__}: {str(e)[-800:]}"}
                res[side]["wall_s"] = round(time.time() - t0, 1)
                print(f"  {json.dumps(res[side])[:400]}", file=sys.stderr, flush=True)
            result["sizes"][size] = {"state_bytes": state, "task_args": SIZES[size],
                                     "sides": res, "goals": goals(size, res, state)}
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
