"""State for a newly formed group: from a surviving peer's memory, or from a checkpoint.

Peer restore sends one worker's *full* (unsharded) training state to every member of the new group
in two broadcasts over a gloo group: a JSON skeleton (structure, shapes, dtypes, and the small
non-tensor values such as optimizer hyper-parameters and the scheduler state), then every tensor
packed into one byte buffer. JSON, not pickle: nothing a peer sends is ever executed. Receivers
load it with `set_state_dict(full_state_dict=True)`, which under FSDP2 keeps only their own shard,
so the same path serves DDP replicas and an FSDP2 group that grows.

The transfer is checked: sender and receivers each take a CRC-32 over every byte sent (the
skeleton, then the packed buffer), and one tiny all-reduce after the transfer (a slot per rank,
the checksum in it) is the vote every rank reads the same way: every rank returns the state, or
every rank raises `StateTransferMismatch` naming the source, its checksum and what each receiver
got. So no rank is left waiting in a collective its peers abandoned, and the checksum needs no
round trip of its own. The buffer goes in chunks, each broadcast asynchronously, so both sides take
the checksum of one chunk while the next one travels: the check hides behind the transfer.
CRC-32 (zlib's, in the standard library) because it is position-sensitive, catches every burst of
up to 32 flipped bits, releases the GIL, and runs at 2-6 GB/s here (measured in
docs/fault-tolerance.md); a plain sum would be faster but misses reordered words.

Checkpoint restore (resharded by DCP) lives in `saver.load_checkpoint`.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from train.state import FullState

_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                               torch.bool, torch.complex64, torch.complex128)}


def _encode(obj: Any, tensors: List[torch.Tensor]) -> Any:
    """A JSON-able skeleton of `obj`; tensors are replaced by {"t": index, shape, dtype}. Dicts keep
    their key types (optimizer state may be keyed by int), tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        if str(obj.dtype) not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {obj.dtype} to a peer")
        tensors.append(obj.detach().cpu().contiguous())
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


def _decode(node: Any, tensors: List[torch.Tensor]) -> Any:
    if "t" in node:
        return tensors[node["t"]]
    if "d" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["d"]}
    if "u" in node:
        return tuple(_decode(v, tensors) for v in node["u"])
    if "l" in node:
        return [_decode(v, tensors) for v in node["l"]]
    return node["v"]


def _specs(node: Any, out: List[Tuple[int, List[int], str]]) -> None:
    if "t" in node:
        out.append((node["t"], node["shape"], node["dtype"]))
    for key in ("d", "u", "l"):
        for child in node.get(key, ()):
            for c in (child if key == "d" else [child]):
                _specs(c, out)


class StateTransferMismatch(RuntimeError):
    """A peer's state arrived with another checksum than its sender computed: raised on every
    rank of the transfer (the sender included). `got`: receiver rank -> the checksum it got."""

    def __init__(self, src: int, expected: int, got: Dict[int, int]):
        self.src, self.expected, self.got = src, expected, dict(got)
        receivers = ", ".join(f"rank {r} got {g:08x}" for r, g in sorted(self.got.items()))
        super().__init__(f"the state sent by rank {src} failed its checksum (crc32 "
                         f"{expected:08x} sent; {receivers})")

    def __reduce__(self):  # it crosses the Ray boundary: rebuilt from its fields
        return type(self), (self.src, self.expected, self.got)


def checksum(*buffers) -> int:
    """CRC-32 over the buffers' bytes, in order (bytes, or uint8 CPU tensors)."""
    crc = 0
    for b in buffers:
        if isinstance(b, torch.Tensor):
            if not b.numel():
                continue
            b = b.numpy()
        crc = zlib.crc32(b, crc)
    return crc


def verify(expected: int, *buffers) -> Optional[int]:
    """None when the buffers' checksum is `expected`; otherwise the checksum they have."""
    got = checksum(*buffers)
    return None if got == expected else got


def flip_bit(buf: torch.Tensor) -> None:
    """Flip the lowest bit of the middle byte (chaos `corrupt_transfer`: under a float32 weight
    that is one unit in the last place, a corruption nothing else would notice)."""
    if buf.numel():
        buf[buf.numel() // 2] ^= 1


CHUNK_BYTES = 16 << 20  # the packed buffer travels in pieces this size (checksummed in turn)


def _vote(crc: int, src: int, group) -> None:
    """The outcome, the same on every rank: each fills its slot (by global rank) with the
    checksum it took + 1, a MAX all-reduce gathers them, and every receiver's is compared with
    the sender's. Raises StateTransferMismatch on every rank when any differs."""
    slots = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    slots[dist.get_rank()] = crc + 1
    dist.all_reduce(slots, op=dist.ReduceOp.MAX, group=group)
    sums = slots.tolist()
    expected = sums[src] - 1
    got = {r: v - 1 for r, v in enumerate(sums) if v and r != src and v - 1 != expected}
    if got:
        raise StateTransferMismatch(src, expected, got)


def _stream(buf: torch.Tensor, src: int, group, crc: int, checked: bool = True) -> int:
    """Broadcast `buf` in chunks, all started at once; take the running checksum of each chunk
    once it is through (a receiver) or while it goes (the sender), so it overlaps the rest."""
    chunks = [buf[i:i + CHUNK_BYTES] for i in range(0, buf.numel(), CHUNK_BYTES)]
    works = [dist.broadcast(c, src=src, group=group, async_op=True) for c in chunks]
    for chunk, work in zip(chunks, works):
        if dist.get_rank() != src:
            work.wait()
        if checked:
            crc = zlib.crc32(chunk.numpy(), crc)
    for work in works:
        work.wait()
    return crc


def broadcast_full_state(full: Optional[FullState], src: int, group,
                         tamper: Optional[Callable[[torch.Tensor], None]] = None) -> FullState:
    """Collective over `group` (global rank `src` sends `full`): every rank returns the state, or
    every rank raises StateTransferMismatch. `tamper` (chaos only) alters the sender's packed
    buffer after its checksum is taken, as a corruption on the way would."""
    rank = dist.get_rank()
    header = torch.zeros(2, dtype=torch.int64)  # skeleton bytes, packed bytes
    if rank == src:
        assert full is not None, "the peer source holds no state"
        tensors: List[torch.Tensor] = []
        skeleton = json.dumps(_encode(full, tensors)).encode()
        flat = [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
        packed = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
        header[0], header[1] = len(skeleton), packed.numel()
        dist.broadcast(header, src=src, group=group)
        raw = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8)
        dist.broadcast(raw, src=src, group=group)
        crc = checksum(skeleton)
        if tamper is not None:  # the checksum of the bytes as they were, then the damage
            crc = checksum(skeleton, packed)
            tamper(packed)
        crc = _stream(packed, src, group, crc, checked=tamper is None)
        _vote(crc, src, group)
        return full
    dist.broadcast(header, src=src, group=group)
    raw = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.broadcast(raw, src=src, group=group)
    packed = torch.empty(int(header[1]), dtype=torch.uint8)
    _vote(_stream(packed, src, group, checksum(raw)), src, group)
    return _unpack(json.loads(bytes(raw.numpy()).decode()), packed)


def _unpack(skeleton: Any, packed: torch.Tensor) -> FullState:
    specs: List[Tuple[int, List[int], str]] = []
    _specs(skeleton, specs)
    specs.sort()
    sizes = []
    for _, shape, dtype in specs:
        numel = 1
        for d in shape:
            numel *= d
        sizes.append(numel * torch.empty(0, dtype=_DTYPES[dtype]).element_size())
    assert sum(sizes) == packed.numel(), "the skeleton does not describe the packed buffer"
    tensors, offset = [], 0
    for (_, shape, dtype), nbytes in zip(specs, sizes):
        chunk = packed[offset:offset + nbytes]
        offset += nbytes
        tensors.append(chunk.view(_DTYPES[dtype]).reshape(shape) if nbytes
                       else torch.empty(shape, dtype=_DTYPES[dtype]))
    return _decode(skeleton, tensors)
