"""In-memory snapshots of sharded (FSDP2) training state, and their resharding.

Under FSDP2 a lost rank takes its shards with it. So every `checkpoint.memory_interval_steps`
steps each rank copies its own shard of everything a resume needs (the state a checkpoint
holds: model and optimizer shards, step, scheduler, its RNG) into host memory, and sends a copy
to a *buddy*, a rank on another node. On a loss, every member of the new generation asks the
holders of the old shards (their owners, or the buddies of lost owners) for just the rows its new
shard needs, at one step every old shard is held at, and assembles its own shard: no storage
read, no rank ever holds more than its new shard plus the pieces in flight, and any new world
size works (a DTensor's rows are split on dim 0 by FSDP2, so a new shard is a row range).

A snapshot is flat: `path -> entry`, where `path` walks the nested state dict ("model/w",
"optim/state/w/exp_avg", "extra/step", "rng/rank2") and an entry is a `Rows` (this rank's rows of
a DTensor), a plain tensor (replicated: the step, Adam's step counts, the scheduler as JSON) or a
plain value (the optimizer's hyper-parameters). No Ray in here: the worker moves them.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

KEEP = 2  # steps kept per owner: the newest, and the one before while the newest travels
RNG_PREFIX = "rng/"


class SnapshotError(RuntimeError):
    """The held pieces do not make up a shard (a gap, a shape that disagrees): the state must
    come from elsewhere (a checkpoint)."""


@dataclass
class Rows:
    """Rows [offset, offset + len(data)) of a DTensor whose global shape is `shape`."""
    offset: int
    data: torch.Tensor
    shape: Tuple[int, ...]


@dataclass
class Snapshot:
    step: int
    world_size: int  # of the generation that took it (the owners are its ranks)
    entries: Dict[str, Any]
    nbytes: int


def _is_dtensor(x: Any) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "to_local")


def flatten(sd: Any, prefix: str = "") -> Dict[str, Any]:
    """Nested dicts and lists -> {path: leaf}."""
    if isinstance(sd, dict):
        items: Iterable = sd.items()
    elif isinstance(sd, (list, tuple)):
        items = enumerate(sd)
    else:
        return {prefix: sd}
    out: Dict[str, Any] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def rebuild(template: Any, leaves: Dict[str, Any], prefix: str = "") -> Any:
    """`template` with every leaf replaced by `leaves[path]` (kept where absent)."""
    if isinstance(template, dict):
        return {k: rebuild(v, leaves, f"{prefix}/{k}" if prefix else str(k))
                for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        seq = [rebuild(v, leaves, f"{prefix}/{i}" if prefix else str(i))
               for i, v in enumerate(template)]
        return type(template)(seq) if isinstance(template, tuple) else seq
    return leaves.get(prefix, template)


def local_rows(dt) -> Tuple[int, int]:
    """(first global row, row count) of this rank's shard of DTensor `dt`. Only dim 0 may be
    split (FSDP2's Shard(0), replicated over an HSDP mesh's other dim)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh,
                                                          dt.placements)
    if tuple(shape[1:]) != tuple(dt.shape[1:]) or any(offset[1:]):
        raise SnapshotError(f"a DTensor of shape {tuple(dt.shape)} is split beyond dim 0 "
                            f"({dt.placements}): in-memory snapshots need row shards")
    return int(offset[0]), int(shape[0])


def take(sd: Dict[str, Any], step: int, world_size: int) -> Snapshot:
    """Copy this rank's part of the checkpoint state dict `sd` into host memory."""
    entries: Dict[str, Any] = {}
    nbytes = 0
    for path, leaf in flatten(sd).items():
        if _is_dtensor(leaf):
            off, _ = local_rows(leaf)
            data = leaf.to_local().detach().to("cpu", copy=True).contiguous()
            entries[path] = Rows(off, data, tuple(leaf.shape))
            nbytes += data.numel() * data.element_size()
        elif isinstance(leaf, torch.Tensor):
            entries[path] = leaf.detach().to("cpu", copy=True)
            nbytes += leaf.numel() * leaf.element_size()
        else:
            entries[path] = copy.deepcopy(leaf)
    return Snapshot(step, world_size, entries, nbytes)


def pieces(snap: Snapshot, wanted: Dict[str, Tuple[int, int]], shared: bool,
           rng_of: Optional[str]) -> Dict[str, Any]:
    """What a holder sends one member: for each wanted sharded `path -> (first, stop)` the rows
    of that range this snapshot holds (cloned: a view would pickle its whole storage), every
    replicated entry if `shared`, and the RNG entry `rng_of` if asked and held."""
    out: Dict[str, Any] = {}
    for path, (lo, hi) in wanted.items():
        e = snap.entries.get(path)
        if not isinstance(e, Rows):
            continue
        a, b = max(lo, e.offset), min(hi, e.offset + e.data.shape[0])
        if a < b:
            out[path] = Rows(a, e.data[a - e.offset:b - e.offset].clone(), e.shape)
    if shared:
        for path, e in snap.entries.items():
            if not isinstance(e, Rows) and not path.startswith(RNG_PREFIX):
                out[path] = e
    if rng_of is not None and rng_of in snap.entries:
        out[rng_of] = snap.entries[rng_of]
    return out


def wanted_rows(template: Dict[str, Any]) -> Dict[str, Tuple[int, int]]:
    """path -> (first, stop) global rows this rank's new shard needs, for each DTensor leaf."""
    out = {}
    for path, leaf in flatten(template).items():
        if _is_dtensor(leaf):
            off, n = local_rows(leaf)
            out[path] = (off, off + n)
    return out


def assemble(template: Dict[str, Any], received: Iterable[Dict[str, Any]],
             rng_key: str) -> Dict[str, Any]:
    """This rank's new state dict: `template` (its freshly built state, which gives the new
    shards' shapes and placements) filled from the holders' pieces. Raises SnapshotError if a
    row of a shard or a replicated entry is missing; the RNG entry is dropped when no piece
    holds it (a rank the old world did not have)."""
    from torch.distributed.tensor import DTensor

    flat = flatten(template)
    got: Dict[str, List[Rows]] = {}
    shared: Dict[str, Any] = {}
    for part in received:
        for path, e in part.items():
            if isinstance(e, Rows):
                got.setdefault(path, []).append(e)
            else:
                shared[path] = e
    leaves: Dict[str, Any] = {}
    for path, leaf in flat.items():
        if _is_dtensor(leaf):
            off, n = local_rows(leaf)
            local = torch.empty((n, *leaf.shape[1:]), dtype=leaf.dtype)
            covered = 0
            for r in got.get(path, []):
                if tuple(r.shape) != tuple(leaf.shape):
                    raise SnapshotError(f"{path}: held shape {r.shape}, wanted {tuple(leaf.shape)}")
                local[r.offset - off:r.offset - off + r.data.shape[0]] = r.data
                covered += r.data.shape[0]
            if covered != n:
                raise SnapshotError(f"{path}: {covered} of {n} rows held")
            leaves[path] = DTensor.from_local(local.to(leaf.device), leaf.device_mesh,
                                              leaf.placements, run_check=False,
                                              shape=leaf.shape, stride=leaf.stride())
        elif path == rng_key:
            continue
        elif path in shared:
            leaves[path] = shared[path]
        else:
            raise SnapshotError(f"{path}: held by no snapshot")
    sd = rebuild(template, leaves)
    if rng_key in shared:
        sd[rng_key] = shared[rng_key]
    else:
        sd.pop(rng_key, None)
    return sd


class SnapshotStore:
    """A worker's snapshots, its own and the copies it holds for others, of one generation:
    owner rank -> step -> Snapshot, the newest KEEP steps per owner. Written by the train thread
    (its own) and the control thread (copies), read by the control thread (heartbeats, pieces
    asked by peers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation: Optional[int] = None
        self._snaps: Dict[int, Dict[int, Snapshot]] = {}
        self.peak_bytes = 0

    def put(self, generation: int, owner: int, snap: Snapshot) -> None:
        with self._lock:
            if self.generation is None or generation > self.generation:
                # a later generation trains: the older one's shards are of another world
                self.generation, self._snaps = generation, {}
            elif generation < self.generation:
                return  # a copy that arrived late from a generation already over
            steps = self._snaps.setdefault(owner, {})
            steps[snap.step] = snap
            for s in sorted(steps)[:-KEEP]:
                del steps[s]
            self.peak_bytes = max(self.peak_bytes, self._bytes())

    def _bytes(self) -> int:
        return sum(s.nbytes for steps in self._snaps.values() for s in steps.values())

    def held(self) -> Tuple[Optional[int], Dict[int, List[int]], int]:
        """(generation, owner -> steps held, world size of that generation)."""
        with self._lock:
            world = max((s.world_size for steps in self._snaps.values() for s in steps.values()),
                        default=0)
            return self.generation, {o: sorted(s) for o, s in self._snaps.items()}, world

    def get(self, generation: int, owner: int, step: int) -> Snapshot:
        with self._lock:
            snap = self._snaps.get(owner, {}).get(step) if generation == self.generation else None
        if snap is None:
            raise SnapshotError(f"no snapshot of rank {owner} at step {step} "
                                f"(generation {generation}) held here")
        return snap

    def clear(self) -> None:
        with self._lock:
            self.generation, self._snaps = None, {}


def buddies(nodes: List[str]) -> Dict[int, int]:
    """rank -> the rank holding its copy: the next rank (cyclically) on another node, or the
    next rank at all when every rank shares one node. `nodes[r]` is rank r's node."""
    n = len(nodes)
    out = {}
    for r in range(n):
        others = [(r + k) % n for k in range(1, n) if nodes[(r + k) % n] != nodes[r]]
        out[r] = others[0] if others else (r + 1) % n
    return {r: b for r, b in out.items() if b != r}

