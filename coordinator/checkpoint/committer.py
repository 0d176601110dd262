"""The driver's side of checkpoints: pick what to resume from, commit saves, apply retention."""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

from coordinator.checkpoint import manifest as mf
from coordinator.events import Event
from coordinator.protocol import SaveReport

logger = logging.getLogger(__name__)


def absolute_uri(uri: str) -> str:
    """Local paths become absolute, so workers with another working directory agree on them."""
    if "://" in uri:
        return uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(uri)


def log_resume(info: mf.CheckpointInfo, total_steps: int) -> None:
    logger.info("resuming from checkpoint step %d (%s, saved by %s workers)", info.step,
                info.path, info.world_size)
    if info.step >= total_steps:
        logger.warning("nothing left to train: the checkpoint is at step %d and train.steps=%d; "
                       "raise train.steps to continue, or use another run.dir / checkpoint.uri "
                       "to start afresh", info.step, total_steps)


class Committer:
    def __init__(self, uri: str, storage_options: Dict, keep: int, verify_on_load: bool,
                 config_hash: str, events, fault: Optional[Callable[[], None]] = None,
                 guard: Optional[Callable[[], None]] = None):
        """`events`: the job's Bus (or an EventLog): commits are announced there. `fault`: a
        fault point for the manifest writes (chaos only: a `checkpoint.faults.StorageOutage`'s
        `check`). `guard`: called before each manifest write and each retention pass; raises
        (`coordinator.lease.LeaseLost`) when another job has taken the location over, so this
        one never commits or deletes under it."""
        self.uri = absolute_uri(uri)
        self.options = dict(storage_options)
        self.keep, self.verify_on_load = keep, verify_on_load
        self.config_hash = config_hash
        self.events = events
        self.fault = fault
        self.guard = guard
        self.protected: set = set()  # steps that must not be deleted (the one restored from)
        # (generation, step) -> rank -> report: a save commits once every rank of the generation
        # that wrote it reported; a generation that ends first leaves its save uncommitted.
        self._pending: Dict[Tuple[int, int], Dict[int, SaveReport]] = {}
        self._ended = -1  # the newest generation ended by end_generation
        self.committed: List[int] = []
        self.failed: List[int] = []

    # ---- resume ---------------------------------------------------------------------------
    def resolve_resume(self) -> Optional[mf.CheckpointInfo]:
        """The newest committed (and, with verify_on_load, verified) checkpoint, or None. Newer
        ones passed over are logged with the reason."""
        chosen, skipped = mf.resolve_latest(self.uri, self.options, self.verify_on_load)
        for ci in skipped:
            logger.warning("checkpoint step %d at %s not used: %s%s", ci.step, ci.path, ci.reason,
                           f"; falling back to step {chosen.step}" if chosen else "")
            self.events.emit(Event.CHECKPOINT_SKIPPED, step=ci.step, status=ci.status,
                             reason=ci.reason)
        if chosen is not None:
            self.protected.add(chosen.step)
            if chosen.manifest.get("config_hash") != self.config_hash:
                logger.info("resuming from step %d saved under another config (hash %s, now %s)",
                            chosen.step, chosen.manifest.get("config_hash"), self.config_hash)
        return chosen

    def latest_step(self) -> Optional[int]:
        """The newest checkpoint known committed (this run's commits or the one resumed from),
        without touching storage; `resolve_resume` reads and verifies it before a restore."""
        steps = self.committed + sorted(self.protected)
        return max(steps) if steps else None

    # ---- commit ---------------------------------------------------------------------------
    def on_save(self, rep: SaveReport) -> None:
        world_size, generation = rep.world_size, rep.generation
        if generation <= self._ended:
            return  # its generation already ended without it: never committed
        key = (generation, rep.step)
        reports = self._pending.setdefault(key, {})
        reports[rep.rank] = rep
        if len(reports) < world_size:
            return
        del self._pending[key]
        waited = max(r.waited_s for r in reports.values())
        if waited > 0.01:
            logger.warning("checkpoint step %d waited %.2fs for the previous save to persist "
                           "(raise checkpoint.interval_steps if this recurs)", rep.step, waited)
            self.events.emit(Event.CHECKPOINT_WAIT, step=rep.step, waited_s=round(waited, 4))
        bad = {r: x.error for r, x in sorted(reports.items()) if not x.ok}
        if bad:
            ranks = sorted(bad)
            return self._failed(rep.step, f"ranks {ranks} could not persist: {bad[ranks[0]]}",
                                stall_s=max(r.stall_s for r in reports.values()))
        if self.guard is not None:
            self.guard()
        files: Dict[str, Dict] = {}
        for r in reports.values():
            files.update(r.files)
        try:
            manifest = mf.write_manifest(self.uri, self.options, rep.step, files, world_size,
                                         generation, self.config_hash, before_write=self.fault)
        except Exception as e:  # the storage failed at the last moment: not committed
            return self._failed(rep.step, f"manifest write failed: {type(e).__name__}: {e}")
        stall = max(r.stall_s for r in reports.values())
        persist = max(r.persist_s for r in reports.values())
        self.committed.append(rep.step)
        self.events.emit(Event.CHECKPOINT_COMMITTED, step=rep.step,
                         uri=f"{self.uri.rstrip('/')}/{mf.step_name(rep.step)}",
                         bytes=manifest["bytes"], stall_s=round(stall, 4),
                         persist_s=round(persist, 4))
        logger.info("checkpoint step %d committed: %.1f MB, stall %.3fs, persist %.2fs",
                    rep.step, manifest["bytes"] / 1e6, stall, persist)
        self.retain()

    def end_generation(self, generation: int) -> None:
        """Generation `generation` (and older) is over: saves some of its ranks never reported
        (a rank was lost while writing) can no longer commit."""
        self._ended = max(self._ended, generation)
        for key in sorted(k for k in self._pending if k[0] <= generation):
            reports = self._pending.pop(key)
            missing = reports[next(iter(reports))].world_size - len(reports)
            self._failed(key[1], f"{missing} rank(s) of generation {key[0]} never finished "
                                 "writing (lost during the save)")

    def _failed(self, step: int, reason: str, stall_s: Optional[float] = None) -> None:
        self.failed.append(step)
        logger.error("checkpoint step %d not committed: %s", step, reason)
        extra = {} if stall_s is None else {"stall_s": round(stall_s, 4)}
        self.events.emit(Event.CHECKPOINT_FAILED, step=step, reason=reason, **extra)

    def retain(self) -> None:
        """Keep the newest `keep` committed checkpoints; a failed delete is logged, not fatal."""
        if self.guard is not None:
            self.guard()
        try:
            infos = mf.list_checkpoints(self.uri, self.options)
        except Exception as e:
            logger.warning("retention skipped: cannot list %s: %s", self.uri, e)
            return
        inflight = {step for _, step in self._pending}
        for step in mf.retention_victims(infos, self.keep, self.protected | inflight):
            try:
                mf.delete_checkpoint(self.uri, self.options, step)
                logger.info("retention: deleted checkpoint step %d (checkpoint.keep=%d)", step,
                            self.keep)
            except Exception as e:
                logger.warning("retention: could not delete step %d: %s", step, e)
