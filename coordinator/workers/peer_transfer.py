"""A DDP replica's training state to the members of a new generation that lack it.

Only what is missing moves. The *holders* are the members whose replica is at the source step
(the survivors, except one left a step behind by a failure inside the last all-reduce); every
other member (a newcomer, that survivor) *receives*. A holder receives nothing. Each holder sends
one stripe of the state's bytes to every receiver, point to point, from the tensors' own storage;
a receiver takes each stripe straight into its own tensors: its model's parameters and buffers
(which it has, built), and its optimizer's state (its own where the shapes fit, else allocated
once, in place). No rank packs the state into one buffer or holds a second copy of it, and the
more holders there are the more senders share the bytes.

First the structure: the first holder sends each receiver a JSON skeleton (every tensor's key,
shape and dtype, and the small values: optimizer hyper-parameters, the scheduler, the step).
JSON, not pickle: nothing a peer sends is ever executed. A receiver whose own model does not
have the same tensors refuses before a byte of state moves (a task that builds different models
on different workers).

Every byte is checked: each stripe's CRC32C is taken as it passes (the holder's while its sends
are in flight, the receiver's as each chunk lands), and one all-reduce of a (rank x stripe) table
after the transfer is the vote every member reads the same way: every member returns, or every
member raises `StateTransferMismatch` naming the holder of the bad stripe. So no member is left
waiting in a collective its peers abandoned. A receiver's state is then half written: the
caller must not keep it (see TrainWorker._restore).

On a GPU the group is gloo and the tensors are in device memory: chunks pass through one host
buffer per side (bounded memory, not a copy of the state).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from coordinator import crc32c
from train import parallel

CHUNK_BYTES = 16 << 20  # one message; its checksum is taken while the next ones travel

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                               torch.bool, torch.complex64, torch.complex128)}


class StateTransferMismatch(RuntimeError):
    """A peer's state arrived with another checksum than its sender computed: raised on every
    member of the transfer (the senders included). `src`: the holder of the first bad stripe;
    `got`: receiver rank -> the checksum it got for that stripe."""

    def __init__(self, src: int, expected: int, got: Dict[int, int]):
        self.src, self.expected, self.got = src, expected, dict(got)
        receivers = ", ".join(f"rank {r} got {g:08x}" for r, g in sorted(self.got.items()))
        super().__init__(f"the state sent by rank {src} failed its checksum (crc32c "
                         f"{expected:08x} sent; {receivers})")

    def __reduce__(self):  # it crosses the Ray boundary: rebuilt from its fields
        return type(self), (self.src, self.expected, self.got)


class StateLayoutError(RuntimeError):
    """A receiver's model does not hold the tensors the holders' does."""


def flip_bit(buf: torch.Tensor) -> None:
    """Flip the lowest bit of the middle byte (chaos `corrupt_transfer`: under a float32 weight
    that is one unit in the last place, a corruption nothing else would notice)."""
    if buf.numel():
        buf[buf.numel() // 2] ^= 1


# ---- the state as (skeleton, tensors) ----------------------------------------------------------

def _encode(obj: Any, tensors: List[torch.Tensor]) -> Any:
    """A JSON-able skeleton of `obj`; a tensor becomes {"t": index, shape, dtype} and is appended
    to `tensors` as it is (no copy). Dicts keep their key types (optimizer state is keyed by
    int), tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        if str(obj.dtype) not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {obj.dtype} to a peer")
        tensors.append(obj.detach())
        return {"t": len(tensors) - 1, "shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"u": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return {"l": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"cannot send a {type(obj).__name__} to a peer (tensors, numbers, strings, "
                    "lists and dicts only)")


def _decode(node: Any, make: Callable[[Tuple, Dict[str, Any]], torch.Tensor],
            path: Tuple = ()) -> Any:
    """The object a skeleton describes; `make(path, node)` gives the tensor for a tensor node
    (path: the keys leading to it)."""
    if "t" in node:
        return make(path, node)
    if "d" in node:
        out = {}
        for k, v in node["d"]:
            key = _decode(k, make, path)
            out[key] = _decode(v, make, path + (key,))
        return out
    if "u" in node:
        return tuple(_decode(v, make, path + (i,)) for i, v in enumerate(node["u"]))
    if "l" in node:
        return [_decode(v, make, path + (i,)) for i, v in enumerate(node["l"])]
    return node["v"]


def replica(state) -> Dict[str, Any]:
    """A DDP rank's whole training state, every tensor its own (shared storage, no copy): the
    unwrapped model's state dict, the optimizer's (keyed by parameter index), the step and the
    scheduler."""
    model = parallel.unwrap(state.model)
    return {"model": model.state_dict(), "optim": state.optimizer.state_dict(),
            "step": state.step,
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Piece:
    tensor: int  # index into the tensor list
    start: int  # byte offset in that tensor
    nbytes: int


def stripes(sizes: Sequence[int], holders: int, chunk: int = CHUNK_BYTES) -> List[List[_Piece]]:
    """The state's bytes (tensors of `sizes` bytes, in order) cut into chunks and dealt into
    `holders` contiguous stripes of about equal bytes: stripe k is what the k-th holder sends.
    Every member computes the same cut from the same sizes."""
    pieces = [_Piece(i, off, min(chunk, size - off))
              for i, size in enumerate(sizes) for off in range(0, size, chunk)]
    total = sum(sizes)
    out: List[List[_Piece]] = [[] for _ in range(holders)]
    done = 0
    for p in pieces:
        # the stripe the middle of this piece falls in
        k = min(holders - 1, (2 * done + p.nbytes) * holders // (2 * total)) if total else 0
        out[k].append(p)
        done += p.nbytes
    return out


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class _HostStage:
    """Device tensors travel through one reusable host buffer per member (gloo sends host
    memory): a chunk at a time, so the transfer's host memory is one chunk, not a state."""

    def __init__(self, chunk: int):
        self._buf: Optional[torch.Tensor] = None
        self._chunk = chunk

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self._buf is None:
            self._buf = torch.empty(self._chunk, dtype=torch.uint8,
                                    pin_memory=torch.cuda.is_available())
        return self._buf[:nbytes]


# ---- the transfer -----------------------------------------------------------------------------

@dataclass
class TransferStats:
    received_bytes: int = 0
    sent_bytes: int = 0


def _send_skeleton(skeleton: bytes, dst: int, group) -> None:
    dist.send(torch.tensor([len(skeleton)], dtype=torch.int64), dst=dst, group=group)
    dist.send(torch.frombuffer(bytearray(skeleton), dtype=torch.uint8), dst=dst, group=group)


def _recv_skeleton(src: int, group) -> Any:
    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, src=src, group=group)
    raw = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(raw, src=src, group=group)
    return json.loads(bytes(raw.numpy()).decode()), crc32c.value(raw)


def _send_stripe(tensors: List[torch.Tensor], stripe: List[_Piece], receivers: List[int],
                 group, tamper: Optional[Callable[[torch.Tensor], None]]) -> Tuple[int, int]:
    """Send this holder's stripe to every receiver; (crc32c of the stripe, bytes sent)."""
    crc, sent, stage = 0, 0, _HostStage(CHUNK_BYTES)
    on_host = all(tensors[p.tensor].device.type == "cpu" for p in stripe)
    works = []
    for i, p in enumerate(stripe):
        flat = _bytes_of(tensors[p.tensor])[p.start:p.start + p.nbytes]
        if not on_host:  # one chunk at a time through the host buffer
            host = stage.buffer(p.nbytes)
            host.copy_(flat)
            flat = host
        out = flat
        if tamper is not None and i == len(stripe) // 2:  # chaos: the wire, not the state
            out = flat.clone()
            tamper(out)
        for r in receivers:
            works.append(dist.isend(out, dst=r, group=group))
        crc = crc32c.extend(crc, flat)  # while the sends are in flight
        sent += p.nbytes * len(receivers)
        if not on_host or out is not flat:
            for w in works:
                w.wait()
            works = []
    for w in works:
        w.wait()
    return crc, sent


def _recv_stripes(dest: List[torch.Tensor], cut: List[List[_Piece]], holders: List[int],
                  group) -> List[int]:
    """Receive every stripe into `dest` (stripe k from holders[k]); the crc32c of each."""
    crcs = [0] * len(cut)
    stage = _HostStage(CHUNK_BYTES)
    on_host = all(t.device.type == "cpu" and t.is_contiguous() for t in dest)
    if not on_host:  # one chunk at a time through the host buffer, stripe after stripe
        for k, stripe in enumerate(cut):
            for p in stripe:
                host = stage.buffer(p.nbytes)
                dist.recv(host, src=holders[k], group=group)
                crcs[k] = crc32c.extend(crcs[k], host)
                t = dest[p.tensor]
                flat = t.reshape(-1).view(torch.uint8) if t.is_contiguous() else None
                if flat is None:
                    raise StateLayoutError("a non-contiguous tensor cannot take a peer's state")
                flat[p.start:p.start + p.nbytes].copy_(host)
        return crcs
    # every chunk straight into its place, all posted at once; checked in order as they land
    posted = [[(p, dist.irecv(_bytes_of(dest[p.tensor])[p.start:p.start + p.nbytes],
                              src=holders[k], group=group)) for p in stripe]
              for k, stripe in enumerate(cut)]
    for k, works in enumerate(posted):
        for p, work in works:
            work.wait()
            crcs[k] = crc32c.extend(
                crcs[k], _bytes_of(dest[p.tensor])[p.start:p.start + p.nbytes])
    return crcs


def _vote(table: torch.Tensor, holders: List[int], receivers: List[int], group) -> None:
    """The outcome, the same on every member: each fills its row of the (rank x stripe) table
    with the checksums it took + 1 (a holder its own stripe's), a MAX all-reduce gathers them,
    and every receiver's stripes are compared with their holders'. Raises
    StateTransferMismatch on every member when any differs."""
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    rows = table.tolist()
    for k, h in enumerate(holders):
        expected = rows[h][k] - 1
        got = {r: rows[r][k] - 1 for r in receivers if rows[r][k] - 1 != expected}
        if got:
            raise StateTransferMismatch(h, expected, got)


def transfer(state, holders: List[int], group,
             tamper: Optional[Callable[[torch.Tensor], None]] = None,
             chunk: int = CHUNK_BYTES) -> TransferStats:
    """Collective over `group` (every member calls it): the members not in `holders` (global
    ranks whose replicas are at the source step, the first of them sending the structure) take
    the holders' state into their own `state` (a TrainState, DDP, unwrapped or wrapped). Returns
    what moved to or from this member. Every member returns, or every member raises
    StateTransferMismatch (or a gloo error: a member was lost). `tamper` (chaos only) alters
    one chunk a holder sends, after its checksum is taken, as a corruption on the wire would."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    holders = sorted(holders)
    receivers = [r for r in range(world) if r not in holders]
    stats = TransferStats()
    if not receivers:
        return stats  # every member holds the state already: nothing to move
    table = torch.zeros(world, len(holders) + 1, dtype=torch.int64)  # the last column: skeleton
    if rank in holders:
        tensors: List[torch.Tensor] = []
        skeleton = json.dumps(_encode(replica(state), tensors)).encode()
        if rank == holders[0]:
            for r in receivers:
                _send_skeleton(skeleton, r, group)
            table[rank, -1] = crc32c.value(skeleton) + 1
        cut = stripes([_nbytes(t) for t in tensors], len(holders), chunk)
        k = holders.index(rank)
        flat = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        crc, stats.sent_bytes = _send_stripe(flat, cut[k], receivers, group,
                                             tamper if k == 0 else None)
        table[rank, k] = crc + 1
    else:
        skeleton, skel_crc = _recv_skeleton(holders[0], group)
        table[rank, -1] = skel_crc + 1
        dest, full = _destinations(state, skeleton)
        cut = stripes([_nbytes(t) for t in dest], len(holders), chunk)
        for k, crc in enumerate(_recv_stripes(dest, cut, holders, group)):
            table[rank, k] = crc + 1
        stats.received_bytes = sum(_nbytes(t) for t in dest)
    _vote(table, holders + [holders[0]], receivers, group)
    if rank not in holders:
        _apply(state, full)
    return stats


def _destinations(state, skeleton: Any) -> Tuple[List[torch.Tensor], Dict[str, Any]]:
    """The tensors a receiver takes the state into, in the skeleton's order, and the state they
    make up: its own model tensors (which must match), its optimizer's own state tensors where
    they match, new ones (allocated where the parameter lives) where they do not."""
    model = parallel.unwrap(state.model)
    own_model = model.state_dict()
    own_optim = state.optimizer.state_dict()["state"]
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    dest: Dict[int, torch.Tensor] = {}

    def make(path: Tuple, node: Dict[str, Any]) -> torch.Tensor:
        shape, dtype = torch.Size(node["shape"]), _DTYPES[node["dtype"]]
        mine = None
        if path[0] == "model":
            mine = own_model.get(path[1])
            if mine is None or mine.shape != shape or mine.dtype != dtype:
                have = "missing" if mine is None else f"{tuple(mine.shape)} {mine.dtype}"
                raise StateLayoutError(
                    f"the peers' model has {path[1]} as {tuple(shape)} {dtype}, this worker's "
                    f"is {have}: every worker must build the same model")
            mine = mine.detach()
        elif path[0] == "optim" and len(path) == 4 and path[1] == "state":
            own = own_optim.get(path[2], {}).get(path[3])
            if isinstance(own, torch.Tensor) and own.shape == shape and own.dtype == dtype \
                    and own.is_contiguous():
                mine = own
            else:
                where = params[path[2]].device if path[2] < len(params) and \
                    params[path[2]].shape == shape else torch.device("cpu")
                mine = torch.empty(shape, dtype=dtype, device=where)
        if mine is None:  # anything else (a tensor-valued hyper-parameter, say): its own
            mine = torch.empty(shape, dtype=dtype)
        dest[node["t"]] = mine
        return mine

    full = _decode(skeleton, make)
    return [dest[i] for i in range(len(dest))], full


def _apply(state, full: Dict[str, Any]) -> None:
    """Make the received state this rank's: the model tensors are in place already; the
    optimizer takes its state and hyper-parameters (its state dict's own tensors, no copy)."""
    state.optimizer.zero_grad(set_to_none=True)  # a failed step's gradients are garbage
    state.optimizer.load_state_dict(full["optim"])
    state.step = int(full["step"])
    if state.scheduler is not None and full.get("scheduler") is not None:
        state.scheduler.load_state_dict(full["scheduler"])


# ---- a full state to every member (an FSDP2 group that grows) -----------------------------------

def broadcast_full(full: Optional[Dict[str, Any]], src: int, group,
                   tamper: Optional[Callable[[torch.Tensor], None]] = None) -> Dict[str, Any]:
    """Collective over `group` (global rank `src` sends `full`, a gathered FSDP2 state on CPU):
    every member returns the state, or every member raises StateTransferMismatch. Each member
    rebuilds its model on the new mesh and keeps only its own shard of what arrives, so every
    member needs all of it. The tensors travel from the sender's own storage into tensors the
    receivers allocate, chunk by chunk; nothing is packed. `tamper`: as in `transfer`."""
    rank = dist.get_rank()
    header = torch.zeros(1, dtype=torch.int64)
    tensors: List[torch.Tensor] = []
    if rank == src:
        assert full is not None, "the peer source holds no state"
        raw = torch.frombuffer(bytearray(json.dumps(_encode(full, tensors)).encode()),
                               dtype=torch.uint8)
        header[0] = raw.numel()
        dist.broadcast(header, src=src, group=group)
    else:
        dist.broadcast(header, src=src, group=group)
        raw = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.broadcast(raw, src=src, group=group)
    crc = crc32c.value(raw)
    if rank != src:
        full = _decode(json.loads(bytes(raw.numpy()).decode()),
                       lambda path, node: tensors.append(torch.empty(
                           node["shape"], dtype=_DTYPES[node["dtype"]])) or tensors[-1])
    pieces = [(t, off, min(CHUNK_BYTES, _nbytes(t) - off))
              for t in tensors for off in range(0, _nbytes(t), CHUNK_BYTES)]
    works = []
    for i, (t, off, n) in enumerate(pieces):
        flat = _bytes_of(t.contiguous())[off:off + n]
        out = flat
        if rank == src and tamper is not None and i == len(pieces) // 2:
            out = flat.clone()
            tamper(out)
        works.append((flat, out, dist.broadcast(out, src=src, group=group, async_op=True)))
    for flat, out, work in works:
        work.wait()
        crc = crc32c.extend(crc, flat if rank == src else out)
    table = torch.zeros(dist.get_world_size(), 1, dtype=torch.int64)
    table[rank, 0] = crc + 1
    _vote(table, [src], [r for r in range(dist.get_world_size()) if r != src], group)
    return full
