"""Checkpoint cost: synchronous save vs the async stall, against raw memcpy and raw writes.

    .venv/bin/python scripts/bench_checkpoint.py --json [--size-gb 1.0] [--s3]

A model state of --size-gb on CPU (one process, a gloo group of 1), saved with our saver to local
disk (a temp dir under --dir) and, with --s3, to a moto S3 server started on 127.0.0.1. Prints one
JSON object per target with:
  sync_save_s      CheckpointSaver(async=False): stage + persist, all blocking
  async_stall_s    CheckpointSaver(async=True): what training waits for (staging into reused
                   buffers), the second save of the run
  stall_ratio      async_stall_s / sync_save_s                              (goal <= 0.05)
  memcpy_s         a raw copy of the same tensors into preallocated buffers
  stall_vs_memcpy  async_stall_s / memcpy_s                                 (goal <= 2)
  persist_s        background persist time of that async save (the checksum on the fly included)
  raw_write_s      the same bytes written sequentially to the same place, then fsync/closed
  throughput_ratio (bytes / persist_s) / (bytes / raw_write_s)             (goal >= 0.8)
  verify_GBps      rereading and rechecking every file of that save (inspect --verify's work)
The top-level figures use the default checksum (checkpoint.hash: crc32c); `by_hash` has them for
each checksum, measured in the same interleaved runs; `spread` is [min, max] over the runs and
`met` says which goal holds.
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
import time
import urllib.request

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


def bench_target(name: str, uri: str, options, sd, group, repeats: int,
                 hashes=HASHES) -> dict:
    """Medians over `repeats` interleaved runs of each measurement (this machine is noisy): in
    each run a synchronous save, one async save per checksum in `hashes`, and a raw write."""
    size = nbytes(sd)
    savers = {h: CheckpointSaver(uri, options, True, 0, group, retries=1, hash_name=h)
              for h in hashes}
    for h, saver in savers.items():
        saver.save(1, sd)  # the first async save allocates the staging buffers
        saver.wait()
        _drop(uri, options, 1)
    sync = CheckpointSaver(uri, options, False, 0, group, retries=1, hash_name=hashes[0])
    sync.save(99, sd)  # warm, like the async saver: steady state reuses its buffers
    _drop(uri, options, 99)
    sync_times, raws = [], []
    stalls = {h: [] for h in hashes}
    verifies = {h: [] for h in hashes}
    step = 2
    # Interleaved, so that each method sees the same state of the page cache and the disk.
    for i in range(repeats):
        t0 = time.perf_counter()
        sync.save(100 + i, sd)
        sync_times.append(time.perf_counter() - t0)
        assert sync.reports[-1].ok, sync.reports[-1].error
        _drop(uri, options, 100 + i)
        for h, saver in savers.items():
            t0 = time.perf_counter()
            saver.save(step, sd)
            stalls[h].append(time.perf_counter() - t0)
            saver.wait()  # the stall alone, not a wait for the previous persist
            verifies[h].append(time_verify(uri, options, step, h))
            _drop(uri, options, step)
            step += 1
        raws.append(time_raw_write(sd, uri, options))
    for saver in (*savers.values(), sync):
        saver.close()
    persists = {}
    for h, saver in savers.items():
        assert all(r.ok for r in saver.reports), [r.error for r in saver.reports]
        persists[h] = [r.persist_s for r in list(saver.reports)[1:]]
    sync_s, raw = statistics.median(sync_times), statistics.median(raws)
    memcpy = statistics.median(time_memcpy(sd) for _ in range(repeats))
    by_hash = {}
    for h in hashes:
        stall, persist = statistics.median(stalls[h]), statistics.median(persists[h])
        verify = statistics.median(verifies[h])
        by_hash[h] = {
            "async_stall_s": round(stall, 4), "stall_ratio": round(stall / sync_s, 4),
            "stall_vs_memcpy": round(stall / memcpy, 3), "persist_s": round(persist, 4),
            "persist_MBps": round(size / persist / 1e6, 1),
            "throughput_ratio": round(raw / persist, 4),
            "verify_s": round(verify, 4), "verify_GBps": round(size / verify / 1e9, 2),
            "spread": {"async_stall_s": benchlib.spread(stalls[h]), "persist_s": benchlib.spread(persists[h]),
                       "verify_s": benchlib.spread(verifies[h])},
        }
    default = by_hash[hashes[0]]
    out = {
        "target": name, "bytes": size, "repeats": repeats, "hash": hashes[0],
        "sync_save_s": round(sync_s, 4), "memcpy_s": round(memcpy, 4),
        "raw_write_s": round(raw, 4), "raw_write_MBps": round(size / raw / 1e6, 1),
        **{k: v for k, v in default.items() if k != "spread"},
        "by_hash": by_hash,
        "spread": {"sync_save_s": benchlib.spread(sync_times), "raw_write_s": benchlib.spread(raws),
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
                                    a.repeats))
        print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if a.s3:
        proc = start_moto()
        try:
            results.append(bench_target("s3-moto", "s3://bench/ckpt", {}, sd, group, a.repeats))
        finally:
            proc.kill()
    print(json.dumps({"benchmark": "checkpoint", "machine": machine(), "results": results}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
