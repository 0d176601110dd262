"""The sharded path on a GPU, without Ray: one short prepared run on a machine with one GPU.

What it checks (each result a JSON field; nothing here is a test: CI has no GPU):
- `two_ranks_one_gpu`: whether NCCL forms a group of two processes on the same GPU (if it does,
  `release`: a rank blocked in an all-reduce with a silent peer, released by aborting its
  ProcessGroupNCCL from another thread, as the worker's release does, and how long it took).
- `roundtrip`: FSDP2 and HSDP (world 1, nccl, bf16 compute) train a few steps; a snapshot of the
  shard (device -> pinned host memory, coordinator/workers/snapshots.take) is assembled into a
  freshly built state: weights equal bit for bit, and a few more steps agree exactly.
- `snapshot`: steps/s of a large shard's training (params + Adam's two moments, fp32) with a
  snapshot after every step against none (the copy overlaps the next step), and what the first
  snapshot (pinning its buffer) costs.
- `reform`: NCCL aborted, the group destroyed and a new one formed in the same process (what a
  survivor does between generations), and the time it took.

    python scripts/gpu_check.py --out gpu.json [--layers 8 --width 8192]
    python scripts/gpu_check.py --device cpu     # the same on gloo, to try the script here
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from coordinator.workers import snapshots as snap  # noqa: E402  (no Ray in there)
from coordinator.workers.device_copies import DeviceCopies  # noqa: E402
from train.loop import run_steps  # noqa: E402
from train.state import (apply_loaded, build_state, checkpoint_state,  # noqa: E402
                         full_model_state)
from train.step import Recipe  # noqa: E402
from train.task import make_task  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(backend: str, rank: int, world: int, port: int) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _abort(device: torch.device) -> None:
    """What the worker's release does under NCCL (coordinator/workers/worker._abort_nccl)."""
    if device.type == "cuda":
        dist.distributed_c10d._get_default_group()._get_backend(device).abort()


# ---- two ranks on one GPU; the release of a blocked one ------------------------------------

def _pair(rank: int, port: int, dev: str, q) -> None:
    device = torch.device(dev)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(0)
        _init(_backend(device), rank, 2, port)
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        q.put((rank, "formed", float(t[0])))
        if rank == 1:
            time.sleep(30)  # silent: rank 0's next all-reduce waits on it
            return
        released = {}

        def release() -> None:
            time.sleep(2.0)
            released["t"] = time.monotonic()
            _abort(device)

        work = dist.all_reduce(t, async_op=True)
        threading.Thread(target=release, daemon=True).start()
        end = time.monotonic() + 20
        while not work.is_completed() and time.monotonic() < end:
            time.sleep(0.005)
        out = {"completed": work.is_completed(),
               "released_s": round(time.monotonic() - released.get("t", time.monotonic()), 3)}
        try:
            work.wait()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out["after"] = "no error"
        except Exception as e:  # the abort's effect, seen by the blocked rank
            out["after"] = str(e).splitlines()[0][:200]
        q.put((rank, "release", out))
    except Exception as e:
        q.put((rank, "error", str(e).splitlines()[0][:300] if str(e) else repr(e)))
    finally:
        os._exit(0)


def two_ranks(device: torch.device) -> dict:
    os.environ.setdefault("NCCL_DEBUG", "WARN")  # the children inherit it
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_pair, args=(r, port, device.type, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    out: dict = {"formed": False}
    deadline = time.monotonic() + 45
    got = []
    while time.monotonic() < deadline and len(got) < 3:
        try:
            got.append(q.get(timeout=1))
        except Exception:
            if not any(p.is_alive() for p in procs):
                break
        if any(kind == "error" for _, kind, _ in got):
            break
    codes = [p.exitcode for p in procs]  # None: still running (killed now)
    for p in procs:
        p.kill()
        p.join(5)
    if not out["formed"] and not any(kind == "error" for _, kind, _ in got):
        out["exit_codes"] = codes  # (the child's stderr has NCCL's own words: NCCL_DEBUG=WARN)
    for rank, kind, value in got:
        if kind == "formed":
            out["formed"] = True
        elif kind == "error":
            out.setdefault("errors", {})[rank] = value
        elif kind == "release":
            out["release"] = value
    return out


# ---- a snapshot round trip: FSDP2 and HSDP ----------------------------------------------------

def roundtrip(device: torch.device, parallelism: str, steps: int = 5) -> dict:
    task = make_task("train.tasks.gpt:TinyGPT", {})
    recipe = Recipe(precision="bf16" if device.type == "cuda" else "fp32")
    sgs = 1 if parallelism == "hsdp" else None
    kw = dict(global_batch_size=16, world_size=1, rank=0, device=device)
    a = build_state(task, parallelism, device, 0, 50, recipe=recipe,
                    mesh_name=f"{parallelism}_a", shard_group_size=sgs)
    run_steps(a, seed=0, until_step=steps, **kw)
    t = time.perf_counter()
    taken = snap.take(snap.flatten(checkpoint_state(a, 0)), a.step, 1)
    take_s = time.perf_counter() - t
    b = build_state(task, parallelism, device, 1, 50, recipe=recipe,  # another init
                    mesh_name=f"{parallelism}_b", shard_group_size=sgs)
    template = checkpoint_state(b, 0)
    wanted = snap.wanted_rows(template)
    sd = snap.assemble(template, [snap.pieces(taken, wanted, True, "rng/rank0")], "rng/rank0")
    apply_loaded(b, sd, 0)
    fa, fb = full_model_state(a), full_model_state(b)
    equal = sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    for st in (a, b):
        run_steps(st, seed=0, until_step=steps + 3, **kw)
    fa, fb = full_model_state(a), full_model_state(b)
    after = all(torch.equal(fa[k], fb[k]) for k in fa)
    return {"restored_equal": equal, "equal_after_3_more_steps": after,
            "snapshot_bytes": taken.nbytes, "take_s": round(take_s, 4),
            "pinned": bool(taken.buffer.is_pinned())}


# ---- the cost of a snapshot of a large shard ---------------------------------------------------

def snapshot_cost(device: torch.device, layers: int, width: int, rounds: int = 3,
                  steps: int = 5) -> dict:
    """Steps/s with a snapshot after every step against none, in interleaved rounds of `steps`
    steps (timed to the end of the round: a copy overlaps the next step's compute, and the
    next optimizer update waits for it, as in a worker: device_copies.DeviceCopies)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cuda = device.type == "cuda"
    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("big",))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(layers)]).to(device)
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(4096 if cuda else 64, width, device=device)
    store, cache, copies = snap.SnapshotStore(), {}, DeviceCopies(snap.KEEP)
    takes = []

    def step() -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    step()  # Adam's moments exist from here on
    sync()
    leaves = {}
    for name, p in model.named_parameters():
        leaves[f"model/{name}"] = p
        for key, v in opt.state[p].items():
            leaves[f"optim/state/{name}/{key}"] = v

    def run(n: int, snapshots: bool) -> float:
        t = time.perf_counter()
        for _ in range(n):
            step()
            if snapshots:
                t0 = time.perf_counter()
                s = snap.take(leaves, len(takes) + 1, 1, cache)
                copies.taken(opt, s.ready, s.nbytes)
                store.put(1, 0, s)
                takes.append(time.perf_counter() - t0)
        sync()
        return (time.perf_counter() - t) / n

    first = run(1, True)  # the first snapshot pins its buffer (the next ones are pinned ahead)
    run(3, True)  # warm: the store full, the pinned buffers in the allocator's cache
    plain, snapped = [], []
    for _ in range(rounds):
        plain.append(run(steps, False))
        snapped.append(run(steps, True))
    # the update right after a snapshot waits for its copy: the snapshot holds the weights
    # from before the update, whole (two layers compared: their clones fit anywhere)
    named = list(model.named_parameters())[:2]
    before = {n: p._local_tensor.clone() for n, p in named}
    s = snap.take(leaves, len(takes) + 1, 1, cache)
    copies.taken(opt, s.ready, s.nbytes)
    step()
    sync()
    copies.close()
    ok = all(torch.equal(s.entries[f"model/{n}"].data.to(device), before[n]) for n, _ in named)
    changed = any(not torch.equal(before[n], p._local_tensor) for n, p in named)
    out = {"layers": layers, "width": width, "state_bytes": s.nbytes,
           "first_snapshot_step_s": round(first, 3),
           "step_s_without": [round(v, 4) for v in plain],
           "step_s_with": [round(v, 4) for v in snapped],
           "ratio": round(statistics.median(plain) / statistics.median(snapped), 3),
           "take_call_s_median": round(statistics.median(takes[4:]), 4),
           "snapshot_before_update_intact": ok, "update_changed_weights": changed,
           "host_bytes_held": store.peak_bytes}
    if cuda:
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---- a new group in the same process after an abort -------------------------------------------

def reform(device: torch.device) -> dict:
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    t0 = time.perf_counter()
    _abort(device)
    dist.destroy_process_group()
    _init(_backend(device), 0, 1, _port())
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"ok": float(t[0]) == 1.0, "abort_to_new_group_s": round(time.perf_counter() - t0, 3)}


def _guard(name: str, fn, *args) -> dict:
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               "where": traceback.format_exc().splitlines()[-3][:300]}
    out["wall_s"] = round(time.perf_counter() - t, 2)
    print(f"{name}: {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    result = {"torch": torch.__version__, "device": args.device,
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "nccl": ".".join(map(str, torch.cuda.nccl.version()))
              if device.type == "cuda" else None}
    print(json.dumps(result), flush=True)
    result["two_ranks_one_gpu"] = _guard("two_ranks_one_gpu", two_ranks, device)
    _init(_backend(device), 0, 1, _port())
    result["roundtrip_fsdp"] = _guard("roundtrip_fsdp", roundtrip, device, "fsdp")
    result["roundtrip_hsdp"] = _guard("roundtrip_hsdp", roundtrip, device, "hsdp")
    result["snapshot"] = _guard("snapshot", snapshot_cost, device, args.layers, args.width)
    result["reform"] = _guard("reform", reform, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
