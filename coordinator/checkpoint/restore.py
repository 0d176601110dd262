"""State for a newly formed group: from a surviving peer's memory, or from a checkpoint.

Peer restore sends one worker's *full* (unsharded) training state to every member of the new group
in two broadcasts over a gloo group: a JSON skeleton (structure, shapes, dtypes, and the small
non-tensor values such as optimizer hyper-parameters and the scheduler state), then every tensor
packed into one byte buffer. JSON, not pickle: nothing a peer sends is ever executed. Receivers
load it with `set_state_dict(full_state_dict=True)`, which under FSDP2 keeps only their own shard,
so the same path serves DDP replicas and an FSDP2 group that grows.

Checkpoint restore (resharded by DCP) lives in `saver.load_checkpoint`.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

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


def _broadcast_bytes(payload: Optional[bytes], src: int, group) -> bytes:
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    if payload is not None:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if buf.numel():
        dist.broadcast(buf, src=src, group=group)
    return bytes(buf.numpy()) if payload is None else payload


def broadcast_full_state(full: Optional[FullState], src: int, group) -> FullState:
    """Collective over `group` (global rank `src` sends `full`, everyone returns it)."""
    rank = dist.get_rank()
    if rank == src:
        assert full is not None, "the peer source holds no state"
        tensors: List[torch.Tensor] = []
        skeleton = _encode(full, tensors)
        _broadcast_bytes(json.dumps(skeleton).encode(), src, group)
        flat = [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
        packed = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
        if packed.numel():
            dist.broadcast(packed, src=src, group=group)
        return full
    skeleton = json.loads(_broadcast_bytes(None, src, group).decode())
    specs: List[Tuple[int, List[int], str]] = []
    _specs(skeleton, specs)
    specs.sort()
    sizes = []
    for _, shape, dtype in specs:
        numel = 1
        for d in shape:
            numel *= d
        sizes.append(numel * torch.empty(0, dtype=_DTYPES[dtype]).element_size())
    packed = torch.empty(sum(sizes), dtype=torch.uint8)
    if packed.numel():
        dist.broadcast(packed, src=src, group=group)
    tensors, offset = [], 0
    for (_, shape, dtype), nbytes in zip(specs, sizes):
        chunk = packed[offset:offset + nbytes]
        offset += nbytes
        tensors.append(chunk.view(_DTYPES[dtype]).reshape(shape) if nbytes
                       else torch.empty(shape, dtype=_DTYPES[dtype]))
    return _decode(skeleton, tensors)
