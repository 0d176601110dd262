"""In-memory snapshots of sharded (FSDP2) training state, and their resharding.

Under FSDP2 a lost rank takes its shards with it. So every `checkpoint.memory_interval_steps`
steps each rank copies its own shard of everything a resume needs (the state a checkpoint
holds: model and optimizer shards, step, scheduler, its RNG) into host memory, and sends a copy
to a *buddy*, a rank on another node (workers/buddy_link.py). On a loss, every member of the new generation asks the
holders of the old shards (their owners, or the buddies of lost owners) for just the rows its new
shard needs, at one step every old shard is held at, and assembles its own shard: no storage
read, no rank ever holds more than its new shard plus the pieces in flight, and any new world
size works (a DTensor's rows are split on dim 0 by FSDP2, so a new shard is a row range).

A snapshot is flat: `path -> entry`, where `path` walks the nested state dict ("model/w",
"optim/state/w/exp_avg", "extra/step", "rng/rank2") and an entry is a `Rows` (this rank's rows of
a DTensor), a plain tensor (replicated: the step, Adam's step counts, the scheduler as JSON) or a
plain value (the optimizer's hyper-parameters). Tensor entries are views into one buffer per
snapshot, described by a JSON header: a copy travels as one block, never as pickle. No Ray in
here: the worker moves them.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from coordinator.checkpoint.staging import local_tensor
from coordinator.workers.device_copies import copy_out

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


class Snapshot:
    """One rank's shard at one step: every tensor in one uint8 `buffer` (so a copy travels to
    the buddy as a single message) and a JSON `header` describing them (see take). The entries
    (path -> Rows, tensor or value, the tensors views into the buffer) are parsed on demand:
    only a recovery reads them."""

    def __init__(self, step: int, world_size: int, entries: Optional[Dict[str, Any]] = None,
                 nbytes: Optional[int] = None, buffer: Optional[torch.Tensor] = None,
                 header: Optional[bytes] = None, ready: Any = None):
        self.step, self.world_size = step, world_size  # world: of the generation that took it
        self.buffer, self.header, self._entries = buffer, header, entries
        self.nbytes = nbytes if nbytes is not None else (
            buffer.numel() if buffer is not None else 0)
        # a CUDA event when the buffer is still being filled from device memory (see take)
        self.ready = ready

    def wait(self) -> None:
        """Until the buffer holds the whole snapshot (a copy from the GPU may still run)."""
        if self.ready is not None:
            self.ready.synchronize()

    @property
    def entries(self) -> Dict[str, Any]:
        if self._entries is None:
            self.wait()
            self._entries = _parse(self.header, self.buffer)
        return self._entries


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


_ALIGN = 16  # every tensor starts at a multiple of this in the buffer (a view needs alignment)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise SnapshotError(f"unknown dtype {name!r} in a snapshot")
    return dt


def _view(buffer: torch.Tensor, at: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    size = n * torch.empty((), dtype=dtype).element_size()
    return buffer[at:at + size].view(dtype).view(tuple(shape))


class LiveLeaves:
    """The leaves of `checkpoint_state` read straight from the live model and optimizer, for
    snapshots taken every step. `get_state_dict` spends ~1.4 ms per call on FQN bookkeeping
    (TinyGPT, 161 leaves); the model's parameters and the optimizer's state tensors are the same
    objects from one step to the next within a generation (a step updates them in place), so
    their paths are mapped once, from the first full state dict, and only the values a step
    re-makes are asked again (step, scheduler, RNG, hyper-parameters). The first read is
    checked against the full state dict: on any difference the full path is used instead."""

    def __init__(self, full: Dict[str, Any]):
        self.paths = list(full)
        self.fixed = {p: v for p, v in full.items() if "/params/" in p}  # FQN lists
        self.trusted: Optional[bool] = None  # None: not checked yet
        self._stable: Optional[Dict[str, Any]] = None  # path -> the live tensor (see read)
        self._groups: List[Tuple[str, int, List[str]]] = []  # hyper-parameters: read each time

    def _resolve(self, model, optimizer) -> None:
        # tied weights (a language model's head and embedding) are one parameter under two
        # names: the state dict has both
        named = dict(model.named_parameters(remove_duplicate=False))
        named.update(model.named_buffers(remove_duplicate=False))
        stable: Dict[str, Any] = {}
        for path in self.paths:
            if path in self.fixed:
                stable[path] = self.fixed[path]
                continue
            head, _, rest = path.partition("/")
            if head == "model":
                stable[path] = named[rest]
            elif head == "optim" and rest.startswith("state/"):
                fqn, key = rest[len("state/"):].rsplit("/", 1)
                stable[path] = optimizer.state[named[fqn]][key]
            elif head == "optim" and rest.startswith("param_groups/"):
                index, *keys = rest[len("param_groups/"):].split("/")
                self._groups.append((path, int(index), keys))
        self._stable = stable

    def read(self, model, optimizer, extra: Dict[str, Any]) -> Dict[str, Any]:
        """path -> leaf, as flatten(checkpoint_state(...)) gives (a model leaf is the parameter
        itself, not a detached alias); `extra`: the flat re-made entries (extra/step,
        extra/scheduler, rng/rank<r>)."""
        if self._stable is None:
            self._resolve(model, optimizer)
        out = dict(self._stable)
        for path, index, keys in self._groups:
            value: Any = optimizer.param_groups[index]
            for k in keys:
                value = value[int(k)] if isinstance(value, (list, tuple)) else value[k]
            out[path] = value
        out.update(extra)
        missing = [p for p in self.paths if p not in out]
        if missing:
            raise KeyError(missing[0])
        return {p: out[p] for p in self.paths}

    def check(self, fast: Dict[str, Any], full: Dict[str, Any], remade: Iterable[str]) -> bool:
        """Whether the fast read is the full state dict leaf for leaf (the same storage, or an
        equal value; `remade`: the paths both made afresh), once per generation."""
        if list(fast) != list(full):
            return False
        skip = set(remade)
        for path, a in fast.items():
            if path in skip:
                continue
            b = full[path]
            if isinstance(b, torch.Tensor):
                la = a.to_local() if _is_dtensor(a) else a
                lb = b.to_local() if _is_dtensor(b) else b
                if not isinstance(a, torch.Tensor) or la.dtype != lb.dtype \
                        or la.data_ptr() != lb.data_ptr() or la.shape != lb.shape:
                    return False
            elif a != b:
                return False
        return True


class _Plan:
    """Where one generation's snapshots put its DTensor shards in the buffer: the same every
    step (shapes and sharding do not change within a generation), so it is made once. Plain
    tensors (the step, the scheduler's JSON, the RNG, Adam's step counts: small, and some change
    size) are laid out after them at every snapshot."""

    def __init__(self, leaves: Dict[str, Any], rows: Dict[str, Tuple[int, int]]):
        self.paths = tuple(leaves)
        self.shards: List[str] = []
        self.plain: List[str] = []
        self.values: List[str] = []
        self.pads: List[Optional[torch.Tensor]] = []  # zero bytes after each shard
        layout = []
        at = 0
        for path, leaf in leaves.items():
            if not isinstance(leaf, torch.Tensor):
                self.values.append(path)
                continue
            if not _is_dtensor(leaf):
                self.plain.append(path)
                continue
            if path not in rows:
                rows[path] = local_rows(leaf)
            t = local_tensor(leaf)
            size = t.numel() * t.element_size()
            self.shards.append(path)
            self.pads.append(_pad(size))
            layout.append([path, str(t.dtype).replace("torch.", ""), list(t.shape), at,
                           rows[path][0], list(leaf.shape)])
            at += size + _padding(size)
        self.size = at
        self.layout = layout
        # the shards' part of the JSON header, the same every step (see take)
        self.layout_json = json.dumps(layout)[1:-1]
        # each shard's local tensor and its bytes as a flat uint8 view: a step updates the
        # tensors in place, so the views stay valid (remade if a tensor is another object)
        self.locals: List[Optional[torch.Tensor]] = [None] * len(self.shards)
        self.views: List[Optional[torch.Tensor]] = [None] * len(self.shards)

    def shard_parts(self, leaves: Dict[str, Any]) -> List[torch.Tensor]:
        parts: List[torch.Tensor] = []
        for i, (path, pad) in enumerate(zip(self.shards, self.pads)):
            t = local_tensor(leaves[path])
            if self.locals[i] is not t:
                self.locals[i], self.views[i] = t, t.reshape(-1).view(torch.uint8)
            parts.append(self.views[i])
            if pad is not None:
                parts.append(pad)
        return parts


def _padding(size: int) -> int:
    return -size % _ALIGN


_PADS = [torch.zeros(n, dtype=torch.uint8) for n in range(_ALIGN)]


def _pad(size: int) -> Optional[torch.Tensor]:
    return _PADS[_padding(size)] if _padding(size) else None


def take(leaves: Dict[str, Any], step: int, world_size: int,
         cache: Optional[Dict[str, Any]] = None) -> Snapshot:
    """Copy this rank's part of the checkpoint state (`leaves`: flatten(checkpoint_state)) into
    one host buffer. `cache`: this generation's layout and shard rows, made by the first call
    (pass the same dict until the generation ends)."""
    cache = cache if cache is not None else {}
    plan = cache.get("plan")
    if plan is None or plan.paths != tuple(leaves):
        plan = cache["plan"] = _Plan(leaves, cache.setdefault("rows", {}))
    parts = plan.shard_parts(leaves)
    layout: List[Any] = []
    at = plan.size
    for path in plan.plain:
        t = leaves[path]
        size = t.numel() * t.element_size()
        parts.append(t.reshape(-1).view(torch.uint8))
        pad = _pad(size)
        if pad is not None:
            parts.append(pad)
        layout.append([path, str(t.dtype).replace("torch.", ""), list(t.shape), at, None, None])
        at += size + _padding(size)
    with torch.no_grad():
        buffer, ready = copy_out(parts, at)
    plain = json.dumps(layout)[1:-1]
    tensors = ", ".join(x for x in (plan.layout_json, plain) if x)
    header = (f'{{"tensors": [{tensors}], "values": '
              f'{json.dumps({p: leaves[p] for p in plan.values})}}}').encode()
    return Snapshot(step, world_size, buffer=buffer, header=header, ready=ready)


def _parse(header: bytes, buffer: torch.Tensor) -> Dict[str, Any]:
    h = json.loads(header.decode())
    entries: Dict[str, Any] = {}
    for path, dtype, shape, at, off, gshape in h["tensors"]:
        t = _view(buffer, at, _dtype(dtype), shape)
        entries[path] = Rows(off, t, tuple(gshape)) if off is not None else t
    entries.update(h["values"])
    return entries


def from_frame(header: bytes, buffer: torch.Tensor, step: int, world_size: int) -> Snapshot:
    """A snapshot received from its owner (its entries are parsed when a recovery asks)."""
    return Snapshot(step, world_size, buffer=buffer, header=header)


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
                out[path] = e.clone() if isinstance(e, torch.Tensor) else e
    if rng_of is not None and rng_of in snap.entries:
        out[rng_of] = snap.entries[rng_of].clone()
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
    (its own) and the buddy link's threads (copies), read by the control thread (heartbeats, pieces
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
    """rank -> the rank holding its copy: a rank on another node (wherever there is one), the
    least loaded so far, nearest after it in rank order on a tie, so each rank holds about one
    copy. `nodes[r]` is rank r's node; with a single node, copies go to the next rank."""
    n = len(nodes)
    load = [0] * n
    out = {}
    for r in range(n):
        after = [(r + k) % n for k in range(1, n)]
        others = [o for o in after if nodes[o] != nodes[r]] or after
        if not others:
            continue  # a world of one: nobody to hold a copy
        b = min(others, key=lambda o: (load[o], others.index(o)))
        load[b] += 1
        out[r] = b
    return out
