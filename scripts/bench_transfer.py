"""What checking a peer's state costs on the recovery path.

    .venv/bin/python scripts/bench_transfer.py [--mb 100] [--repeats 7]

Two gloo processes on this machine; rank 0 sends its full state to rank 1 with
`coordinator.checkpoint.restore.broadcast_full_state`, as an in-place recovery does, for two states:
the default config's (TinyGPT after one AdamW step: weights and both moments) and --mb of float32.
The baseline is the same transfer unchecked, in the same run: the same header, skeleton and
chunked broadcasts and the same unpacking, without the checksums and the vote. Prints one JSON
object, per state (medians of --repeats, timed on the receiver):
  bytes         the packed buffer sent
  checked_s     broadcast_full_state
  baseline_s    the unchecked transfer
  added_s       checked_s - baseline_s
  ratio         checked_s / baseline_s
  crc_s         one CRC-32 over the bytes, alone (what the check would cost if it did not overlap
                the transfer: twice this, once per side)
  crc_gb_per_s  bytes / crc_s
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coordinator.checkpoint.restore import (  # noqa: E402
    _encode, _stream, _unpack, broadcast_full_state, checksum)


def _states(mb: int):
    from train.loop import run_steps
    from train.state import build_state, full_state
    from train.task import make_task

    st = build_state(make_task("train.tasks.gpt:TinyGPT", {}), "ddp", torch.device("cpu"), 0, 10,
                     wrap_ddp=False)
    run_steps(st, seed=0, global_batch_size=16, world_size=1, rank=0,
              device=torch.device("cpu"), until_step=1)
    big = {"model": {"w": torch.randn(mb * (1 << 20) // 4)}, "optim": {}, "step": 1,
           "scheduler": None}
    return {"tinygpt": full_state(st, sharded=False), f"{mb}mb": big}


def _packed(full):
    tensors = []
    skeleton = json.dumps(_encode(full, tensors)).encode()
    flat = [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
    return skeleton, torch.cat(flat)


def _median_s(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _unchecked(full, src, group=None):
    """The transfer without its check: the baseline."""
    header = torch.zeros(2, dtype=torch.int64)
    if dist.get_rank() == src:
        skeleton, packed = _packed(full)
        header[0], header[1] = len(skeleton), packed.numel()
        dist.broadcast(header, src=src, group=group)
        dist.broadcast(torch.frombuffer(bytearray(skeleton), dtype=torch.uint8), src=src,
                       group=group)
        _stream(packed, src, group, 0, checked=False)
        return full
    dist.broadcast(header, src=src, group=group)
    raw = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.broadcast(raw, src=src, group=group)
    packed = torch.empty(int(header[1]), dtype=torch.uint8)
    _stream(packed, src, group, 0, checked=False)
    return _unpack(json.loads(bytes(raw.numpy()).decode()), packed)


def _worker(rank, world, port, out, mb, repeats):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    states = _states(mb) if rank == 0 else None
    result = {}
    for name in ["tinygpt", f"{mb}mb"]:
        full = states[name] if rank == 0 else None
        broadcast_full_state(full, 0, None)  # warm the connections and the allocator
        checked, baseline = [], []
        for _ in range(repeats):  # interleaved, so both see the same load on a noisy machine
            for fn, times in ((broadcast_full_state, checked), (_unchecked, baseline)):
                dist.barrier()
                t0 = time.perf_counter()
                fn(full, 0, None)
                times.append(time.perf_counter() - t0)
        result[name] = {"checked_s": statistics.median(checked),
                        "baseline_s": statistics.median(baseline)}
        if rank == 0:
            skeleton, packed = _packed(full)
            result[name].update(bytes=packed.numel(), crc_s=_median_s(
                lambda: checksum(skeleton, packed), repeats))
        dist.barrier()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=120))
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(2, store.port, d, args.mb, args.repeats),
                                 nprocs=2, join=False, start_method="spawn")
        try:
            deadline = time.monotonic() + 600
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError("the benchmark did not finish in 600s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        send, recv = (torch.load(os.path.join(d, f"rank{r}.pt")) for r in (0, 1))
    out = {}
    for name in send:
        s, r = send[name], recv[name]
        out[name] = {"bytes": s["bytes"], "checked_s": round(r["checked_s"], 5),
                     "baseline_s": round(r["baseline_s"], 5),
                     "added_s": round(r["checked_s"] - r["baseline_s"], 5),
                     "ratio": round(r["checked_s"] / r["baseline_s"], 3),
                     "crc_s": round(s["crc_s"], 5),
                     "crc_gb_per_s": round(s["bytes"] / s["crc_s"] / 1e9, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
