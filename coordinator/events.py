"""The run directory's event log (`events.jsonl`, appended across reruns): the schema of its
events, the writer (`EventLog`, which refuses a record that does not match the schema), one
tolerant reader (`read_events`) and `summary.json`'s atomic write.

The schema is the one place event kinds and field names live: writers emit `Event` kinds,
readers (the goodput analysis, the tests, the scripts) ask for fields with `get_field`, which
refuses a field the schema does not declare. Renaming a field therefore fails loudly at the
writer or the reader instead of silently zeroing a span of the accounting.

Importing this module loads neither Ray nor torch (the analysis reads logs anywhere).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, List, Mapping, Tuple, Union

logger = logging.getLogger(__name__)

# Every record has these two, besides its kind's fields.
ENVELOPE = ("t", "event")  # unix seconds (float), the kind


class Event(str, Enum):
    """The kinds of event. A `str` enum: `Event.RECOVERED == "recovered"`, so a record read back
    compares equal to its kind and a writer may still pass the plain string."""

    JOB_START = "job_start"
    WORKER_START = "worker_start"
    CAPACITY_WAIT = "capacity_wait"
    GROUP_FORMING = "group_forming"
    GROUP_FORMED = "group_formed"
    PROGRESS = "progress"
    EVAL = "eval"
    CHAOS = "chaos"
    FAILURE_DETECTED = "failure_detected"
    NODE_ISOLATED = "node_isolated"
    PAUSING = "pausing"
    RECOVERED = "recovered"
    STATE_TRANSFER_MISMATCH = "state_transfer_mismatch"
    CHECKPOINT_INTERVAL = "checkpoint_interval"
    CHECKPOINT_WAIT = "checkpoint_wait"
    CHECKPOINT_COMMITTED = "checkpoint_committed"
    CHECKPOINT_FAILED = "checkpoint_failed"
    CHECKPOINT_SKIPPED = "checkpoint_skipped"
    NONFINITE_STEP = "nonfinite_step"
    CHECKPOINT_RESTORE_FAILED = "checkpoint_restore_failed"
    JOB_END = "job_end"

    def __str__(self) -> str:  # f"{kind}" writes the name on the log, not "Event.X"
        return self.value


@dataclass(frozen=True)
class Spec:
    """One kind's fields. `required`: the contract's fields (ARCHITECTURE.md, "Run directory")
    and those every emit site writes; a field may be present with the value null (a step time
    not known yet). `optional`: fields some emit sites write. Other fields are allowed (a new
    one is declared here when a reader starts to use it)."""

    doc: str
    required: Tuple[str, ...]
    optional: Tuple[str, ...] = ()

    @property
    def fields(self) -> frozenset:
        return frozenset(self.required + self.optional)


SCHEMA: Dict[Event, Spec] = {
    Event.JOB_START: Spec(
        "a `run` command started (each rerun appends one)",
        ("job", "config_hash", "pid")),
    Event.WORKER_START: Spec(
        "a worker process is up, placed for the next generation",
        ("rank", "pid", "node_id", "generation", "host")),
    Event.CAPACITY_WAIT: Spec(
        "fewer than min_workers fit: waiting, at most failure.wait_for_workers_s",
        ("reason", "step")),
    Event.GROUP_FORMING: Spec(
        "a generation starts forming (cause: start, recovery, grow or rollback)",
        ("generation", "world_size", "source", "cause")),
    Event.GROUP_FORMED: Spec(
        "a generation formed and took its state (source: init, peer, memory or checkpoint) at "
        "`step`; restore_s: the slowest worker's restore; buddies: rank -> the rank holding "
        "copies of its in-memory snapshots (FSDP2)",
        ("generation", "world_size", "ranks", "source", "step", "restore_s"), ("buddies",)),
    Event.PROGRESS: Spec(
        "every run.log_interval_s while steps complete; step_t: when `step` completed",
        ("step", "step_t", "world_size", "loss", "steps_per_s", "grad_norm")),
    Event.EVAL: Spec(
        "the loss over train.eval_samples held-out samples after `step`, computed by the "
        "current world (the same at any world size); eval_s: how long it took",
        ("step", "loss", "samples", "world_size", "eval_s")),
    Event.CHAOS: Spec(
        "a planned fault was injected",
        ("action", "rank", "pid", "step", "at_step")),
    Event.FAILURE_DETECTED: Spec(
        "workers lost (kind: process_exit, node_lost, hang, preempt, collective_error...); "
        "last_step_t: when the last step any rank reported completed",
        ("kind", "ranks", "pids", "generation", "step", "error", "last_step_t")),
    Event.NODE_ISOLATED: Spec(
        "a node failed too often and gets no more workers",
        ("node_id", "failures")),
    Event.PAUSING: Spec(
        "the group is asked to stop at a step boundary (reason: grow or preempt)",
        ("reason", "step")),
    Event.RECOVERED: Spec(
        "the first step completed after a failure (source: peer, memory or checkpoint); "
        "recovery_s: from detection to that step; phases: where that time went "
        "(control/recovery_profile.py); release_s: detection to every survivor out of the "
        "failed group; transfer_s, transfer_bytes: the state taken from peers (memory source: "
        "every member's received rows summed)",
        ("generation", "world_size", "source", "resumed_step", "lost_steps", "recovery_s",
         "last_step_t"), ("phases", "release_s", "transfer_s", "transfer_bytes")),
    Event.STATE_TRANSFER_MISMATCH: Spec(
        "a peer's state failed its checksum on a receiver while `generation` formed: nobody "
        "applied it and the state comes from another source (expected, got: crc32, 8 hex digits)",
        ("generation", "source_rank", "receiver_rank", "expected", "got")),
    Event.CHECKPOINT_INTERVAL: Spec(
        "checkpoint.interval_steps=auto chose an interval, and why",
        ("step", "interval_steps", "interval_s", "stall_s", "persist_s", "job_mtbf_s",
         "mtbf_source", "failures", "exposure_worker_s", "step_s", "reason")),
    Event.CHECKPOINT_WAIT: Spec(
        "a save waited for the previous one to persist",
        ("step", "waited_s")),
    Event.CHECKPOINT_COMMITTED: Spec(
        "every rank's files are durable and the manifest is written",
        ("step", "uri", "bytes", "stall_s", "persist_s")),
    Event.CHECKPOINT_FAILED: Spec(
        "a save did not commit; stall_s when the ranks got as far as staging",
        ("step", "reason"), ("stall_s",)),
    Event.CHECKPOINT_SKIPPED: Spec(
        "a newer checkpoint passed over at resume (status: incomplete, corrupt, or unusable: it "
        "failed to restore)",
        ("step", "status", "reason")),
    Event.NONFINITE_STEP: Spec(
        "a step's loss or gradient norm was non-finite on some rank: no rank applied it; "
        "streak: such steps in a row; action: what the job does (skip, rollback or stop)",
        ("step", "generation", "streak", "action")),
    Event.CHECKPOINT_RESTORE_FAILED: Spec(
        "restoring a checkpoint failed on storage (step null: the storage could not be listed); "
        "attempt: this step's failed restores so far; action: retry (the same step again) or "
        "fall back (to the committed checkpoint before it)",
        ("step", "reason", "attempt", "action")),
    Event.JOB_END: Spec(
        "the command ends (status: finished, failed or interrupted)",
        ("status", "step", "last_step_t")),
}


class EventSchemaError(ValueError):
    """An event that does not match the schema: an unknown kind, a missing required field, or a
    reader asking for a field its kind does not declare."""


def _kind(event: Union[Event, str]) -> Event:
    try:
        return Event(event)
    except ValueError:
        known = ", ".join(k.value for k in Event)
        raise EventSchemaError(f"unknown event kind {str(event)!r} (known: {known})") from None


def validate(event: Union[Event, str], fields: Mapping[str, Any]) -> Event:
    """The kind of a record about to be written; EventSchemaError naming the kind and what is
    wrong when the kind is unknown, a required field is missing, or a field shadows `t` or
    `event`."""
    kind = _kind(event)
    clash = [f for f in ENVELOPE if f in fields]
    if clash:
        raise EventSchemaError(f"event {kind.value!r}: field(s) {', '.join(clash)} are set by "
                               "the log itself")
    missing = [f for f in SCHEMA[kind].required if f not in fields]
    if missing:
        raise EventSchemaError(
            f"event {kind.value!r} lacks required field(s) {', '.join(missing)} (required: "
            f"{', '.join(SCHEMA[kind].required)})")
    return kind


def get_field(record: Mapping[str, Any], kind: Event, name: str, default: Any = None) -> Any:
    """`record[name]` (or `default` when the record lacks it: an older log) for a record of
    `kind`. Refuses a field the schema does not declare for that kind, so a reader cannot drift
    from the writers' names unnoticed."""
    if name not in SCHEMA[kind].fields:
        raise EventSchemaError(f"event {kind.value!r} declares no field {name!r} "
                               f"(declared: {', '.join(sorted(SCHEMA[kind].fields))})")
    if record.get("event") != kind:
        raise EventSchemaError(f"asked for {kind.value}.{name} of a "
                               f"{record.get('event')!r} event")
    return record.get(name, default)


class EventLog:
    """Appends one JSON object per line, each with `t` (unix seconds) and `event`. Every line is
    flushed and fsynced so that a crash of the driver loses no event it already emitted."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")
        # A driver killed in the middle of a line left it without its newline: end it, so the
        # first event of this run is a line of its own, not glued to the torn one.
        if self._f.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")
                    self._f.flush()

    def emit(self, event: Union[Event, str], **fields: Any) -> Dict[str, Any]:
        """Write one event; EventSchemaError (nothing written) if it does not match the schema."""
        kind = validate(event, fields)
        record = {"t": time.time(), "event": kind.value, **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _is_event(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("event"), str)
            and isinstance(record.get("t"), (int, float)) and not isinstance(record["t"], bool))


def read_events(path: str) -> List[Dict[str, Any]]:
    """The events of an `events.jsonl`, in order. Tolerant: blank lines, a line torn by a driver
    killed while writing it (the rerun appends after it), undecodable bytes and lines that are
    not an event (no numeric `t` or no `event`) are skipped with one warning, so the rest of the
    log stays readable. Kinds the schema does not know are kept: the log may be newer than the
    reader."""
    out: List[Dict[str, Any]] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if _is_event(record):
                out.append(record)
            else:
                skipped += 1
    if skipped:
        logger.warning("%s: skipped %d line(s) that are not whole events (a driver killed "
                       "mid-line leaves one)", path, skipped)
    return out


def events_of(path: str, kind: Union[Event, str]) -> List[Dict[str, Any]]:
    """The events of one kind, in order (read as `read_events` reads)."""
    kind = _kind(kind)
    return [e for e in read_events(path) if e["event"] == kind]


def write_json_atomic(path: str, obj: Any) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
