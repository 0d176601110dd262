"""A worker's FSDP2 shards in memory: its snapshots, the buddy link of its generation, and a new
shard rebuilt from the holders' snapshots (the data and its rules: workers/snapshots.py; the
link: workers/buddy_link.py). The TrainWorker owns one and calls it at the points of a
generation's life: the rendezvous (`open_group`), the end of a join (`start_link`), after each
step (`snapshot`), a restore (`restore`) and the teardown (`close`)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Dict, Optional, Tuple

import ray
import torch.distributed as dist

from coordinator.protocol import Source
from coordinator.workers import snapshots as snap_lib
from coordinator.workers.buddy_link import BuddyLink
from coordinator.workers.device_copies import DeviceCopies
from coordinator.workers.release import GroupSockets
from train.errors import short_error
from train.state import TrainState, apply_loaded, checkpoint_extras, checkpoint_state

logger = logging.getLogger(__name__)


class MemoryRestoreError(RuntimeError):
    """The new shard could not be rebuilt from the snapshots (a gap, a holder that does not
    answer): nothing was applied."""


class ShardMemory:
    def __init__(self, interval: int, shard_group_size: Optional[int] = None):
        self.interval = interval  # steps between snapshots; 0: off
        self.shard_group_size = shard_group_size  # HSDP: replicas hold the same rows
        self.store = snap_lib.SnapshotStore()
        self._link: Optional[BuddyLink] = None  # copies to and from the buddies
        self._group = None  # the gloo group the copies travel on
        self._sockets = GroupSockets()  # its connections (shut down at close)
        self._cache: Dict[str, Any] = {}  # this generation's snapshot layout (see take)
        self._live: Optional[snap_lib.LiveLeaves] = None  # this generation's leaf map
        self.transfer_bytes = 0  # what the last restore received
        self.rng_restored = False  # the last restore set this rank's RNG
        self._copies = DeviceCopies(snap_lib.KEEP)  # snapshots of device memory still copying

    def open_group(self, generation: int, store_port: int, timeout: timedelta) -> None:
        """Create this generation's link group (a collective: every member, at the rendezvous)."""
        if not self.interval:
            return
        self._sockets.begin(generation, store_port)
        with self._sockets.track():
            self._group = dist.new_group(backend="gloo", timeout=timeout)

    def start_link(self, generation: int, rank: int, buddies: Optional[Dict[int, int]]) -> None:
        """Start sending this rank's snapshots to its buddy and receiving those it holds."""
        if self._group is not None and buddies:
            self._link = BuddyLink(self._group, generation, rank, buddies.get(rank),
                                   sorted(q for q, b in buddies.items() if b == rank), self.store)

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def snapshot(self, st: TrainState, rank: int, step: int, world_size: int,
                 generation: int) -> None:
        """This rank's shard of the whole training state into host memory, and a copy to its
        buddy (on the link's background thread; never awaited)."""
        remade = snap_lib.flatten(checkpoint_extras(st, rank))
        live = self._live
        if live is None or not live.trusted:
            leaves = snap_lib.flatten(checkpoint_state(st, rank))
            if live is None:  # the first of this generation: map the leaves, check the map
                live = self._live = snap_lib.LiveLeaves(leaves)
                try:
                    fast = live.read(st.model, st.optimizer, remade)
                except (KeyError, IndexError, TypeError) as e:  # a path the map cannot follow
                    logger.info("rank %d: snapshot leaves not mapped (%s)", rank, e)
                    fast = None
                live.trusted = fast is not None and live.check(fast, leaves, remade)
                if not live.trusted:
                    logger.warning("rank %d: the live state differs from its state dict; "
                                   "snapshots take the full state dict this generation", rank)
        else:
            leaves = live.read(st.model, st.optimizer, remade)
        snap = snap_lib.take(leaves, step, world_size, self._cache)
        self._copies.taken(st.optimizer, snap.ready, snap.nbytes)
        self.store.put(generation, rank, snap)
        if self._link is not None:
            self._link.offer(snap)

    def pieces(self, generation: int, owner: int, step: int,
               wanted: Dict[str, Tuple[int, int]], shared: bool,
               rng_of: Optional[str]) -> Dict[str, Any]:
        return snap_lib.pieces(self.store.get(generation, owner, step), wanted, shared, rng_of)

    def restore(self, source: Source, st: TrainState, rank: int, timeout_s: float) -> None:
        """Take this rank's new shard from the snapshots of generation `source.generation` at
        `source.step`: each holder sends the rows of its owner's shard that this shard needs
        (the holder of old rank 0 also the replicated entries, the holder of this rank's old
        self its RNG). Nothing is applied before every piece is here, so a state of mixed steps
        is never loaded; a gap or a holder silent for `timeout_s` raises MemoryRestoreError."""
        template = checkpoint_state(st, rank)
        wanted = snap_lib.wanted_rows(template)
        rng_key = f"rng/rank{rank}"
        first = min(source.handles)  # the replicated entries come from one holder
        here = {owner: self._held_here(source, owner) for owner in source.handles}
        local = {owner: held for owner, held in here.items() if held is not None}
        refs = [handle.snapshot_pieces.remote(source.generation, owner, source.step, wanted,
                                              owner == first, rng_key if owner == rank else None)
                for owner, handle in sorted(source.handles.items()) if owner not in local]
        try:
            mine = [snap_lib.pieces(self.store.get(source.generation, held, source.step), wanted,
                                    owner == first, rng_key if rank in (owner, held) else None)
                    for owner, held in sorted(local.items())]
            received = ray.get(refs, timeout=timeout_s)
            if rank not in source.handles:  # (HSDP: a replica's rows stand in for this rank's)
                mine.append(self._own_rng(source, rank, rng_key))
            sd = snap_lib.assemble(template, mine + received, rng_key)
        except (snap_lib.SnapshotError, ray.exceptions.RayError) as e:
            for ref in refs:
                ray.cancel(ref)
            raise MemoryRestoreError(f"rank {rank} taking its shard from the in-memory "
                                     f"snapshots at step {source.step}: {short_error(e)}") from None
        self.transfer_bytes = sum(e.data.numel() * e.data.element_size()  # from other workers
                                  for part in received for e in part.values()
                                  if isinstance(e, snap_lib.Rows))
        del received, refs, mine
        self.rng_restored = rng_key in sd
        apply_loaded(st, sd, rank)

    def _held_here(self, source: Source, owner: int) -> Optional[int]:
        """An owner whose snapshot at the source's step this worker holds and that holds the
        same rows as `owner`'s: `owner` itself, or under HSDP one of its replicas (the same
        shard in another shard group); None: ask `owner`'s holder. A survivor then reads its
        own shard from its own memory, not through a Ray call to itself."""
        sgs = self.shard_group_size
        _, held, world = self.store.held()
        replicas = range(owner % sgs, world, sgs) if sgs and world > sgs and not world % sgs \
            else [owner]
        for o in sorted(replicas, key=lambda o: o != owner):
            if source.step in held.get(o, ()) and self.store.generation == source.generation:
                return o
        return None

    def _own_rng(self, source: Source, rank: int, rng_key: str) -> Dict[str, Any]:
        """This rank's RNG from its own snapshot as rank `rank` of the old generation, if it
        holds one (a survivor whose shard came from a replica); nothing otherwise."""
        try:
            snap = self.store.get(source.generation, rank, source.step)
        except snap_lib.SnapshotError:
            return {}
        return snap_lib.pieces(snap, {}, False, rng_key)

    def take_transfer_bytes(self) -> int:
        moved, self.transfer_bytes = self.transfer_bytes, 0
        return moved

    def close(self, generation: int) -> None:
        """The generation is over: the copies stop first (what is held now stays as it is), the
        link's connections are shut down, which ends the transfers in flight on both sides."""
        if self._link is not None:
            self._link.close()
            self._sockets.release(generation)
            self._link.join(1.0)
            self._link = None
        self._copies.close()  # the state is about to be rebuilt: the copy in flight ends first
        self._group, self._cache, self._live = None, {}, None
