"""Checkpoint cost: what a save costs training, against a synchronous save, a memcpy and a raw write.

    .venv/bin/python scripts/bench_checkpoint.py --json [--size-gb 1.0] [--step-s 1.0] [--s3]

A model state of --size-gb on CPU (one process, a gloo group of 1), saved with our saver to local
disk (a temp dir under --dir) and, with --s3, to a moto S3 server started on 127.0.0.1. The state
is trained by a stand-in of a training step (`Loop`): --step-s of forward and backward (matmuls on
tensors of their own, which read nothing of the state and write none of it, as a real forward and
backward write no parameter), then an SGD update of every tensor of the state. Prints one JSON
object with, per target:
  sync_save_s      CheckpointSaver(async=False): copy + persist, all blocking
  async_stall_s    what an async save holds the training thread for, as the default config
                   takes it (the copy beside the next step), timed here: the save's call, and
                   the next update's wait for the copy (between the optimizer's first step
                   pre-hook and one registered after the saver's)
  stall_reported_s the same as the saver itself reports it (checkpoint_committed's stall_s)
  boundary_copy_s  the call alone with checkpoint.stage_beside_step=false: the whole copy at the
                   step boundary (what the stall was before the copy moved beside the step)
  first_update_extra_s  how much longer that update ran than one without a save, its wait
                   aside: the copy and the write beside it share the memory and the cores
  training_slowdown_s   the wall time of --window steps with a save at their start, minus the
                   same steps without one: the stall plus everything the copy and the write
                   beside training take from it (on 2 cores, a lot: see raw_write_slowdown_s)
  raw_write_slowdown_s  the same for a bare raw write of the same bytes beside the steps
  stall_ratio      async_stall_s / sync_save_s                              (goal <= 0.05)
  memcpy_s         a raw copy of the same tensors into preallocated buffers
  stall_vs_memcpy  async_stall_s / memcpy_s                                 (goal <= 2)
  persist_s        background write of that async save, from the end of the copy (the checksum
                   on the fly included)
  raw_write_s      the same bytes written sequentially to the same place, then fsync/closed,
                   beside the same training steps as the persist (raw_write_idle_s: alone)
  throughput_ratio (bytes / persist_s) / (bytes / raw_write_s)             (goal >= 0.8)
  verify_GBps      rereading and rechecking every file of that save (inspect --verify's work)
The top-level figures use the default checksum (checkpoint.hash: crc32c); `by_hash` has them for
each checksum, measured in the same interleaved runs; `spread` is [min, max] over the runs and
`met` says which goal holds. Every save's checkpoint is checked to hold the state of the step it
was taken at (not the update after it).
Figures from moto say nothing about real S3 throughput: they show the path works at this size.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchlib  # noqa: E402

from coordinator.checkpoint.saver import CheckpointSaver  # noqa: E402
from coordinator.checkpoint.manifest import step_name  # noqa: E402
from coordinator.checkpoint.storage import (HASHES, filesystem, hash_file, join,  # noqa: E402
                                            list_files)


def make_state(size_gb: float):
    """~size_gb of float32 tensors shaped like a transformer's weights (4096-wide matrices)."""
    n = int(size_gb * 1e9 / 4)
    rows = max(1, n // (4096 * 4096))
    sd = {f"layers.{i}.weight": torch.randn(4096, 4096) for i in range(rows)}
    sd["embed.weight"] = torch.randn(max(1, (n - rows * 4096 * 4096) // 4096), 4096)
    return {"model": sd}


def nbytes(sd) -> int:
    return sum(t.numel() * t.element_size() for t in sd["model"].values())


def time_memcpy(sd) -> float:
    dst = {k: torch.empty_like(v) for k, v in sd["model"].items()}
    for k, v in sd["model"].items():  # touch the pages once, like reused staging buffers
        dst[k].copy_(v)
    t0 = time.perf_counter()
    for k, v in sd["model"].items():
        dst[k].copy_(v)
    return time.perf_counter() - t0


def time_raw_write(sd, uri: str, options) -> float:
    fs, root = filesystem(uri, options)
    path = join(root, "raw-write.bin")
    fs.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    with fs.open(path, "wb") as f:
        for t in sd["model"].values():
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        if hasattr(f, "fileno"):
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    elapsed = time.perf_counter() - t0
    fs.rm(path)
    return elapsed


def _drop(uri: str, options, step: int) -> None:
    """Remove a benchmark checkpoint (moto keeps everything in memory)."""
    fs, root = filesystem(uri, options)
    fs.rm(join(root, step_name(step)), recursive=True)


def time_verify(uri: str, options, step: int, hash_name: str) -> float:
    """Seconds to recheck every file of a step with `hash_name` (what `inspect --verify` and
    `checkpoint.verify_on_load` do), right after the save: the files are in the page cache, so
    this is the checksum's own speed plus the read."""
    fs, root = filesystem(uri, options)
    path = join(root, step_name(step))
    t0 = time.perf_counter()
    for name in list_files(fs, path):
        hash_file(fs, join(path, name), hash_name)
    return time.perf_counter() - t0


class Loop:
    """A training step's stand-in on the state `sd` (see the module docstring): `fb_s` of matmuls
    on tensors of its own, then an SGD update of every tensor of the state (`last_update_s`: how
    long the last update took, its wait for a save's copy included)."""

    def __init__(self, sd, fb_s: float):
        self.sd = sd
        self.params = list(sd["model"].values())
        grads = {}
        for p in self.params:  # one gradient per shape: the update still reads and writes all
            p.grad = grads.setdefault(tuple(p.shape), torch.full_like(p, 1e-3))
        self.opt = torch.optim.SGD(self.params, lr=1e-3)
        self.a = torch.randn(256, 256)
        self.last_update_s = 0.0
        self.last_wait_s = 0.0  # between the update's first and last pre-hooks: a save's wait
        self._marks = [0.0, 0.0]
        self.opt.register_step_pre_hook(lambda *a: self._mark(0))
        t0 = time.perf_counter()
        self._compute(50)
        self.rounds = max(1, int(fb_s / ((time.perf_counter() - t0) / 50)))

    def _mark(self, i: int) -> None:
        self._marks[i] = time.perf_counter()

    def hook_last(self) -> None:
        """A pre-hook after those registered so far (the savers'): the update's wait for a
        save's copy is the time between the first pre-hook and this one."""
        self.opt.register_step_pre_hook(lambda *a: self._mark(1))

    def _compute(self, rounds: int) -> None:
        x = self.a
        for _ in range(rounds):
            x = torch.tanh(x @ self.a)

    def step(self) -> None:
        self._compute(self.rounds)
        t0 = time.perf_counter()
        self.opt.step()
        self.last_update_s = time.perf_counter() - t0
        self.last_wait_s = self._marks[1] - self._marks[0]


@dataclass
class Window:
    wall_s: float  # the window's steps (and the save's call, if any)
    call_s: float = 0.0  # the save's call
    first_update_s: float = 0.0  # the first step's update (its wait for the copy included)
    first_wait_s: float = 0.0  # the first step's update waiting for the save's copy
    beside_s: float = 0.0  # the background work's own time, when there was some
    persisted: bool = False  # the save's write had ended when the window did


def time_window(loop: Loop, steps: int, saver=None, step: int = 0, beside: bool = True,
                background=None) -> Window:
    """`steps` steps, with a save at their start when `saver`, or `background()` on a thread of
    its own beside them."""
    w = Window(0.0)
    thread = None
    if background is not None:
        def run():
            t = time.perf_counter()
            background()
            w.beside_s = time.perf_counter() - t
        thread = threading.Thread(target=run)
    t0 = time.perf_counter()
    if thread is not None:
        thread.start()
    if saver is not None:
        saver.save(step, loop.sd, optimizer=loop.opt if beside else None)
        w.call_s = time.perf_counter() - t0
    for i in range(steps):
        loop.step()
        if i == 0:
            w.first_update_s, w.first_wait_s = loop.last_update_s, loop.last_wait_s
    w.wall_s = time.perf_counter() - t0
    if thread is not None:
        thread.join()
    return w


def saved_first_value(uri: str, options, step: int, key: str) -> float:
    """One element of the saved state, read back (the check that a save holds its own step)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    path = join(uri, step_name(step))
    size = FsspecReader(path, **options).read_metadata().state_dict_metadata[f"model.{key}"].size
    out = {"model": {key: torch.empty(size)}}
    dcp.load(out, storage_reader=FsspecReader(path, **options), no_dist=True)
    return float(out["model"][key][0, 0])


def bench_target(name: str, uri: str, options, sd, group, repeats: int, fb_s: float,
                 window: int, hashes=HASHES) -> dict:
    """Medians over `repeats` interleaved runs of each measurement (this machine is noisy): in
    each run a synchronous save, a window of steps alone and one beside a raw write, a window
    with an async save per checksum in `hashes`, an async save with the whole copy at the
    boundary, and a raw write alone."""
    size = nbytes(sd)
    loop = Loop(sd, fb_s)
    savers = {h: CheckpointSaver(uri, options, True, 0, group, retries=1, hash_name=h)
              for h in hashes}
    for h, saver in savers.items():
        saver.save(1, sd, optimizer=loop.opt)  # the first async save allocates the buffers
        saver.wait()
        _drop(uri, options, 1)
    loop.hook_last()
    sync = CheckpointSaver(uri, options, False, 0, group, retries=1, hash_name=hashes[0])
    sync.save(99, sd)  # warm, like the async saver: steady state reuses its buffers
    _drop(uri, options, 99)
    time_window(loop, window)  # warm the loop
    sync_times, raws, plain, updates, beside_raw, beside_raw_wall, boundary = ([] for _ in range(7))
    runs = {h: [] for h in hashes}
    verifies = {h: [] for h in hashes}
    step = 2
    key = next(iter(sd["model"]))
    # Interleaved, so that each method sees the same state of the page cache and the disk.
    for i in range(repeats):
        t0 = time.perf_counter()
        sync.save(100 + i, sd)
        sync_times.append(time.perf_counter() - t0)
        assert sync.reports[-1].ok, sync.reports[-1].error
        _drop(uri, options, 100 + i)
        base = time_window(loop, window)
        plain.append(base.wall_s)
        updates.append(base.first_update_s)
        w = time_window(loop, window, background=lambda: time_raw_write(sd, uri, options))
        beside_raw.append(w.beside_s)
        beside_raw_wall.append(w.wall_s)
        for h, saver in savers.items():
            at_save = float(loop.params[0][0, 0])
            runs[h].append(time_window(loop, window, saver, step))
            runs[h][-1].persisted = saver._current is None or saver._current.done()
            saver.wait()
            # The save holds its own step's state, not the update made beside its copy.
            assert saved_first_value(uri, options, step, key) == at_save, "torn save"
            verifies[h].append(time_verify(uri, options, step, h))
            _drop(uri, options, step)
            step += 1
        boundary.append(time_window(loop, 1, savers[hashes[0]], step, beside=False).call_s)
        savers[hashes[0]].wait()
        _drop(uri, options, step)
        step += 1
        raws.append(time_raw_write(sd, uri, options))
    for saver in (*savers.values(), sync):
        saver.close()
    med = statistics.median
    sync_s, raw, raw_beside = med(sync_times), med(raws), med(beside_raw)
    base_wall, base_update = med(plain), med(updates)
    memcpy = med(time_memcpy(sd) for _ in range(repeats))
    by_hash = {}
    for h, saver in savers.items():
        reps = list(saver.reports)[1:]
        assert all(r.ok for r in reps), [r.error for r in reps]
        if h == hashes[0]:  # its runs alternate: beside the step, then at the boundary
            reps = reps[0::2]
        # What the training thread waited for: the save's call, and its next update's wait
        # for the copy (both timed here, not taken from the saver's report).
        stalls = [r.call_s + r.first_wait_s for r in runs[h]]
        extra = [r.first_update_s - r.first_wait_s - base_update for r in runs[h]]
        slowdowns = [r.wall_s - b for r, b in zip(runs[h], plain)]
        stall, persist = med(stalls), med([r.persist_s for r in reps])
        verify = med(verifies[h])
        by_hash[h] = {
            "async_stall_s": round(stall, 4), "stall_ratio": round(stall / sync_s, 4),
            "stall_vs_memcpy": round(stall / memcpy, 3),
            "save_call_s": round(med(r.call_s for r in runs[h]), 4),
            "stall_reported_s": round(med(r.stall_s for r in reps), 4),
            "update_wait_s": round(med(r.first_wait_s for r in runs[h]), 4),
            "first_update_extra_s": round(med(extra), 4),
            "training_slowdown_s": round(med(slowdowns), 4),
            "persisted_within_window": all(r.persisted for r in runs[h]),
            "persist_s": round(persist, 4), "persist_MBps": round(size / persist / 1e6, 1),
            "throughput_ratio": round(raw_beside / persist, 4),
            "verify_s": round(verify, 4), "verify_GBps": round(size / verify / 1e9, 2),
            "spread": {"async_stall_s": benchlib.spread(stalls),
                       "training_slowdown_s": benchlib.spread(slowdowns),
                       "persist_s": benchlib.spread([r.persist_s for r in reps]),
                       "verify_s": benchlib.spread(verifies[h])},
        }
    default = by_hash[hashes[0]]
    raw_slowdowns = [w - b for w, b in zip(beside_raw_wall, plain)]
    out = {
        "target": name, "bytes": size, "repeats": repeats, "hash": hashes[0],
        "step_s": round(base_wall / window, 4), "window_steps": window,
        "sync_save_s": round(sync_s, 4), "memcpy_s": round(memcpy, 4),
        "boundary_copy_s": round(med(boundary), 4),
        "raw_write_s": round(raw_beside, 4), "raw_write_MBps": round(size / raw_beside / 1e6, 1),
        "raw_write_idle_s": round(raw, 4),
        "raw_write_slowdown_s": round(med(raw_slowdowns), 4),
        **{k: v for k, v in default.items() if k != "spread"},
        "by_hash": by_hash,
        "spread": {"sync_save_s": benchlib.spread(sync_times),
                   "raw_write_s": benchlib.spread(beside_raw),
                   "raw_write_idle_s": benchlib.spread(raws),
                   "raw_write_slowdown_s": benchlib.spread(raw_slowdowns),
                   "window_s": benchlib.spread(plain), "boundary_copy_s": benchlib.spread(boundary),
                   **default["spread"]},
        "goals": {"stall_ratio": "<= 0.05", "stall_vs_memcpy": "<= 2",
                  "throughput_ratio": ">= 0.8"},
    }
    out["met"] = {"stall_ratio": out["stall_ratio"] <= 0.05,
                  "stall_vs_memcpy": out["stall_vs_memcpy"] <= 2,
                  "throughput_ratio": out["throughput_ratio"] >= 0.8}
    return out


def machine() -> dict:
    return benchlib.machine("google-crc32c")


def start_moto():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(f"{url}/bench", method="PUT"), timeout=10)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      AWS_ENDPOINT_URL=url)
    return proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON only (the default output)")
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--dir", default=None, help="where the local target lives (default: tmp)")
    p.add_argument("--s3", action="store_true", help="also bench a moto S3 server")
    p.add_argument("--repeats", type=int, default=5, help="medians over this many runs")
    p.add_argument("--step-s", type=float, default=1.0,
                   help="seconds of the stand-in forward and backward of each step")
    p.add_argument("--window", type=int, default=3,
                   help="steps timed after each save (enough for its write to end)")
    a = p.parse_args()
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    group = dist.new_group(backend="gloo")
    sd = make_state(a.size_gb)
    print(f"state: {nbytes(sd) / 1e9:.2f} GB", file=sys.stderr)
    results = []
    d = tempfile.mkdtemp(prefix="bench-ckpt-", dir=a.dir)
    try:
        results.append(bench_target("local", os.path.join(d, "ckpt"), {}, sd, group,
                                    a.repeats, a.step_s, a.window))
        print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if a.s3:
        proc = start_moto()
        try:
            results.append(bench_target("s3-moto", "s3://bench/ckpt", {}, sd, group, a.repeats,
                                        a.step_s, a.window))
        finally:
            proc.kill()
    print(json.dumps({"benchmark": "checkpoint", "machine": machine(), "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
