"""The driver's side of checkpoints: pick what to resume from, commit saves, apply retention.

With `background=True` (the runner's) the storage work of a commit (the manifest write and the
retention pass) runs on a thread of its own, in order, and `poll` (called by the controller every
tick) announces what it finished: the driver's loop, and with it failure detection, never waits
on a storage endpoint that stopped answering. `drain` waits for it at the end of the job.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from coordinator.checkpoint import errors
from coordinator.checkpoint import manifest as mf
from coordinator.events import Event
from coordinator.protocol import SaveReport

logger = logging.getLogger(__name__)


# Restores of one checkpoint that may fail on storage before it is passed over for the one before
# (the first may meet a passing read error).
RESTORE_ATTEMPTS = 2


@dataclass
class _Commit:
    """A save every rank reported written: what its manifest and announcement need."""
    step: int
    files: Dict[str, Dict]
    world_size: int
    generation: int
    stall_s: float
    persist_s: float
    keep_steps: frozenset  # retention keeps these (protected and in flight when it was queued)


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
                 guard: Optional[Callable[[], None]] = None,
                 log_path: Optional[str] = None, background: bool = False):
        """`events`: the job's Bus (or an EventLog): commits are announced there. `fault`: a
        fault point for the manifest writes (chaos only: a `checkpoint.faults.StorageOutage`'s
        `check`). `guard`: called before each manifest write and each retention pass; raises
        (`coordinator.lease.LeaseLost`) when another job has taken the location over, so this
        one never commits or deletes under it. `log_path`: where failed saves' details (each
        rank's traceback) are appended; the terminal and the event get one line. `background`:
        the storage work of commits runs on a thread (module docstring); `poll` announces it."""
        self.uri = absolute_uri(uri)
        self.log_path = log_path
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
        self._last_bytes = 0  # the size of the newest checkpoint committed (for a full disk)
        self.unusable: Dict[int, str] = {}  # steps passed over at resume: they failed to restore
        self._restore_failures: Dict[int, int] = {}  # step (-1: listing) -> failed restores
        self._work: Optional[queue.Queue] = queue.Queue() if background else None
        self._done: queue.Queue = queue.Queue()  # what _write returned, for poll
        self._queued = 0  # commits handed to the thread and not yet announced by poll
        self._thread: Optional[threading.Thread] = None

    # ---- resume ---------------------------------------------------------------------------
    def resolve_resume(self) -> Optional[mf.CheckpointInfo]:
        """The newest committed (and, with verify_on_load, verified) checkpoint, or None. Newer
        ones passed over are logged with the reason. Raises `errors.StorageError` (in words)
        when the storage cannot be read at all."""
        try:
            chosen, skipped = mf.resolve_latest(self.uri, self.options, self.verify_on_load,
                                                self.unusable)
        except Exception as e:
            raise errors.classify(e, self.uri) from e
        for ci in skipped:
            logger.warning("checkpoint step %d at %s not used: %s%s", ci.step, ci.path, ci.reason,
                           f"; falling back to step {chosen.step}" if chosen else "")
            self.events.emit(Event.CHECKPOINT_SKIPPED, step=ci.step, status=ci.status,
                             reason=ci.reason)
        if chosen is not None:
            # Only the newest restore needs its files kept: one protected step, not one per
            # restore, or a job restoring many times would keep every checkpoint it restored.
            self.protected = {chosen.step}
            if chosen.manifest.get("config_hash") != self.config_hash:
                logger.info("resuming from step %d saved under another config (hash %s, now %s)",
                            chosen.step, chosen.manifest.get("config_hash"), self.config_hash)
        return chosen

    def restore_failed(self, step: Optional[int], reason: str) -> str:
        """Restoring checkpoint `step` failed on storage (None: its storage could not even be
        listed). The same step is tried again once (a read error may pass); after
        RESTORE_ATTEMPTS failures it is passed over, so the next resolve falls back to the one
        before. Returns what happens next: "retry" or "fall back"; says it with an event."""
        key = -1 if step is None else step
        n = self._restore_failures[key] = self._restore_failures.get(key, 0) + 1
        action = "retry" if n < RESTORE_ATTEMPTS or step is None else "fall back"
        if action == "fall back":
            self.unusable[step] = f"could not be restored ({n} tries): {reason}"
        logger.warning("restoring checkpoint %s failed (%d of %d tries): %s; %s",
                       f"step {step}" if step is not None else f"from {self.uri}", n,
                       RESTORE_ATTEMPTS, reason, "trying it again" if action == "retry" else
                       "falling back to the checkpoint before it")
        self.events.emit(Event.CHECKPOINT_RESTORE_FAILED, step=step, reason=reason, attempt=n,
                         action=action)
        return action

    def latest_step(self) -> Optional[int]:
        """The newest checkpoint known committed (this run's commits or the one resumed from),
        without touching storage; `resolve_resume` reads and verifies it before a restore.
        Steps that failed to restore are not counted."""
        steps = [s for s in self.committed + sorted(self.protected) if s not in self.unusable]
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
        bad = {r: x for r, x in sorted(reports.items()) if not x.ok}
        if bad:
            self._log_details(rep.step, bad)
            return self._failed(rep.step, _why(bad),
                                stall_s=max(r.stall_s for r in reports.values()))
        files: Dict[str, Dict] = {}
        for r in reports.values():
            files.update(r.files)
        commit = _Commit(rep.step, files, world_size, generation,
                         max(r.stall_s for r in reports.values()),
                         max(r.persist_s for r in reports.values()),
                         frozenset(self.protected | {s for _, s in self._pending}))
        if self._work is None:
            self._announce(*self._write(commit))
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._commit_loop, name="checkpoint-commit",
                                            daemon=True)
            self._thread.start()
        self._queued += 1
        self._work.put(commit)

    def poll(self) -> None:
        """Announce the commits the thread finished (the driver's loop calls it every tick).
        Raises what the lease guard raised there (`LeaseLost`)."""
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            self._queued -= 1
            self._announce(*done)

    def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the commits in flight (the end of the job), announcing
        them; one still writing then stays uncommitted, said in one line."""
        deadline = time.monotonic() + timeout_s
        while self._queued:
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning("%d checkpoint manifest write(s) did not finish within %gs: "
                               "not committed", self._queued, timeout_s)
                return
            try:
                done = self._done.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self._queued -= 1
            self._announce(*done)

    def _commit_loop(self) -> None:
        while True:
            self._done.put(self._write(self._work.get()))

    def _write(self, c: _Commit) -> Tuple[_Commit, Optional[Dict], Optional[BaseException], bool]:
        """The storage work of a commit: the lease guard, the manifest write (written last: only
        then does the checkpoint count), then retention. Touches no driver state. Returns
        (commit, manifest or None, error, whether the error is the guard's: raised by
        `_announce`, since it ends the job)."""
        try:
            if self.guard is not None:
                self.guard()
        except Exception as e:  # another job holds the location now: never commit under it
            return c, None, e, True
        try:
            manifest = mf.write_manifest(self.uri, self.options, c.step, c.files, c.world_size,
                                         c.generation, self.config_hash, before_write=self.fault)
        except Exception as e:  # the storage failed at the last moment: not committed
            return c, None, e, False
        self._retain(c.keep_steps)
        return c, manifest, None, False

    def _announce(self, c: _Commit, manifest: Optional[Dict], error: Optional[BaseException],
                  fatal: bool) -> None:
        if fatal:
            raise error
        if manifest is None:
            return self._failed(c.step, f"manifest write failed: {type(error).__name__}: {error}")
        self.committed.append(c.step)
        self._last_bytes = manifest["bytes"]
        self.events.emit(Event.CHECKPOINT_COMMITTED, step=c.step,
                         uri=f"{self.uri.rstrip('/')}/{mf.step_name(c.step)}",
                         bytes=manifest["bytes"], stall_s=round(c.stall_s, 4),
                         persist_s=round(c.persist_s, 4))
        logger.info("checkpoint step %d committed: %.1f MB, stall %.3fs, persist %.2fs",
                    c.step, manifest["bytes"] / 1e6, c.stall_s, c.persist_s)

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
        logger.error("checkpoint step %d not committed: %s%s", step, reason, self._hint(reason))
        extra = {} if stall_s is None else {"stall_s": round(stall_s, 4)}
        self.events.emit(Event.CHECKPOINT_FAILED, step=step, reason=reason, **extra)

    def _hint(self, reason: str) -> str:
        """What a user can do about a full local disk, with the figures."""
        if "no space left" not in reason:
            return ""
        free = errors.local_free_bytes(self.uri)
        last = self._last_bytes
        if free is None or not last:
            return "; free space at checkpoint.uri: the next save tries again"
        return (f"; {free / 1e6:.1f} MB free at {self.uri}, a checkpoint takes "
                f"{last / 1e6:.1f} MB (checkpoint.keep={self.keep} are kept): free space or "
                "lower checkpoint.keep; the next save tries again")

    def _log_details(self, step: int, bad: Dict[int, SaveReport]) -> None:
        """Each failing rank's traceback, appended to the run directory's log (best effort)."""
        if not self.log_path:
            return
        lines = [f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] checkpoint step {step} not "
                 f"committed: {_why(bad)}"]
        for r, x in bad.items():
            lines.append(f"  rank {r}: {x.error}")
            lines += [f"    {line}" for line in (x.detail or "").splitlines()]
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        except OSError as e:  # the run directory's disk may be the full one
            logger.warning("cannot write %s: %s", self.log_path, e)

    def retain(self) -> None:
        """Keep the newest `keep` committed checkpoints; a failed delete is logged, not fatal."""
        if self.guard is not None:
            self.guard()
        self._retain(frozenset(self.protected | {step for _, step in self._pending}))

    def _retain(self, keep_steps: frozenset) -> None:
        try:
            infos = mf.list_checkpoints(self.uri, self.options)
        except Exception as e:
            logger.warning("retention skipped: cannot list %s: %s", self.uri, e)
            return
        for step in mf.retention_victims(infos, self.keep, set(keep_steps)):
            try:
                mf.delete_checkpoint(self.uri, self.options, step)
                logger.info("retention: deleted checkpoint step %d (checkpoint.keep=%d)", step,
                            self.keep)
            except Exception as e:
                logger.warning("retention: could not delete step %d: %s", step, e)


def _why(bad: Dict[int, SaveReport]) -> str:
    """The causes of a failed save, each said once with its ranks: "no space left on device:
    /ckpt/step-00000040 (ranks [0, 1] could not persist)"."""
    by_cause: Dict[str, List[int]] = {}
    for r, x in sorted(bad.items()):
        by_cause.setdefault(x.error or "unknown error", []).append(r)
    return "; ".join(f"{cause} (rank{'s' if len(ranks) > 1 else ''} "
                     f"{ranks if len(ranks) > 1 else ranks[0]} could not persist)"
                     for cause, ranks in by_cause.items())
