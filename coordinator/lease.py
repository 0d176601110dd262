"""One job per run directory and per checkpoint location: a lease (`lease.json`) in each.

A `run` command takes the lease of `run.dir` and of `checkpoint.uri` before it writes anything,
renews both every `RENEW_S` seconds from a thread of its own, and deletes them when it exits. A
second job on either is refused at once (`LeaseHeld`, one line naming the holder). A lease whose
holder is gone is taken over with one log line: on the same host when its pid is dead (at once),
anywhere when it was not renewed for `STALE_S` seconds. A SLURM requeue (the holder has our
SLURM job id: the previous run of this very job) waits up to `STALE_S + REQUEUE_GRACE_S` for
that run's lease to go stale. A job that finds its lease taken over stops (`Leases.lost`).

The lease's record: {host, pid, job, run_dir, slurm_job_id, started, renewed, nonce}; `renewed`
is the holder's clock, so staleness assumes hosts' clocks agree within seconds (NTP).

How each storage makes the writes exclusive: `coordinator/lease_store.py`. Every storage call
is bounded by `CALL_TIMEOUT_S` (a thread with a deadline), so a frozen endpoint costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Optional

from coordinator.lease_store import LEASE_FILE, LocalStore, store_for

logger = logging.getLogger(__name__)

RENEW_S = 5.0  # seconds between renewals
STALE_S = 30.0  # a lease not renewed for this long is taken over
REQUEUE_GRACE_S = 10.0  # a requeue waits STALE_S + this for its previous run's lease
CALL_TIMEOUT_S = 10.0  # bound of one storage call


class LeaseError(RuntimeError):
    """The lease could not be taken: held by another job, or the storage did not answer. The
    message is one line for the user."""


class LeaseHeld(LeaseError):
    pass


class LeaseLost(LeaseError):
    """Our lease was taken over by another job: stop writing."""


@dataclass
class Holder:
    host: str
    pid: int
    job: str
    run_dir: str
    slurm_job_id: Optional[str]
    started: float
    renewed: float
    nonce: str

    @staticmethod
    def me(job: str, run_dir: str) -> "Holder":
        """This process. SLURM_JOB_ID is read here and nowhere else."""
        now = time.time()
        return Holder(host=socket.gethostname(), pid=os.getpid(), job=job, run_dir=run_dir,
                      slurm_job_id=os.environ.get("SLURM_JOB_ID") or None, started=now,
                      renewed=now, nonce=uuid.uuid4().hex)

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    @staticmethod
    def parse(raw: bytes) -> Optional["Holder"]:
        """The record, or None for anything that is not one (empty, truncated, foreign)."""
        try:
            d = json.loads(raw.decode())
            return Holder(host=str(d["host"]), pid=int(d["pid"]), job=str(d["job"]),
                          run_dir=str(d.get("run_dir", "")),
                          slurm_job_id=d.get("slurm_job_id") or None,
                          started=float(d["started"]), renewed=float(d["renewed"]),
                          nonce=str(d["nonce"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        slurm = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"job {self.job!r} (host {self.host}, pid {self.pid}{slurm}, since {_clock(self.started)})"


def _clock(t: float) -> str:
    fmt = "%H:%M:%S" if time.localtime(t)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, time.localtime(t))


def pid_alive(pid: int) -> bool:
    """On this host. A zombie (dead, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def bounded(fn: Callable[[], Any], what: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    """fn() on a thread of its own, given up after `timeout` seconds (the thread is left behind:
    a frozen mount or endpoint may never return it)."""
    out: Dict[str, Any] = {}

    def call():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=call, name="lease-io", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise LeaseError(f"{what}: the storage did not answer within {timeout:.0f}s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ---- one lease -----------------------------------------------------------------------------

class Lease:
    """The lease of one location. `key` names it for the user (`run.dir`, `checkpoint.uri`)."""

    def __init__(self, store, key: str, where: str, me: Holder, stale_s: float = STALE_S,
                 requeue_grace_s: float = REQUEUE_GRACE_S, timeout_s: float = CALL_TIMEOUT_S):
        self.store, self.key, self.where = store, key, where
        self.me = me
        self.stale_s, self.requeue_grace_s, self.timeout_s = stale_s, requeue_grace_s, timeout_s
        self.token: Any = None  # what we last wrote; None: not held
        self.lost_to: Optional[Holder] = None
        self.renewed_t = 0.0  # time.time() of our last successful write
        # renewals (their thread), checks (the driver's) and the release take turns
        self._lock = threading.RLock()

    def _io(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return bounded(fn, f"{self.key} {self.where}: {what} {LEASE_FILE}", self.timeout_s)
        except LeaseError:
            raise
        except Exception as e:
            raise LeaseError(f"{self.key} {self.where}: cannot {what} {LEASE_FILE}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                             ) from None

    def _held(self, holder: Holder) -> LeaseHeld:
        where = "directory" if self.key == "run.dir" else "location"
        return LeaseHeld(f"{self.key} {self.where} is in use by {holder.describe()}; stop it "
                         f"first or set {self.key} to another {where}")

    def _verdict(self, holder: Optional[Holder]) -> Optional[str]:
        """Why the lease may be taken over, or None while its holder is alive."""
        if holder is None:
            return f"unreadable {LEASE_FILE}"
        age = time.time() - holder.renewed
        if age > self.stale_s:
            return f"not renewed for {age:.0f}s"
        if holder.host == self.me.host and not pid_alive(holder.pid):
            return "gone"
        return None

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the holder (LeaseError if the storage did
        not answer)."""
        mine = self.me.to_bytes()
        wait_until = None
        for _ in range(1000):  # each turn writes or sleeps; a storm of racing takers ends here
            token = self._io("create", lambda: self.store.create(mine))
            if token is not None:
                self._took(token)
                return
            got = self._io("read", self.store.read)
            if got is None:
                continue  # released between our create and our read: create again
            raw, current = got
            holder = Holder.parse(raw)
            why = self._verdict(holder)
            if why is None and self.me.slurm_job_id and holder.slurm_job_id == self.me.slurm_job_id:
                # The previous run of this requeued job, killed on another node or not yet reaped:
                # its lease goes stale without renewals.
                if wait_until is None:
                    wait_until = holder.renewed + self.stale_s + self.requeue_grace_s
                    logger.info("lease: %s %s is held by the previous run of SLURM job %s (host "
                                "%s, pid %d); waiting up to %.0fs for it to go stale", self.key,
                                self.where, holder.slurm_job_id, holder.host, holder.pid,
                                max(0.0, wait_until - time.time()))
                if time.time() < wait_until:
                    time.sleep(1.0)
                    continue
            if why is None:
                raise self._held(holder)
            token = self._io("take over", lambda: self.store.replace(mine, current))
            if token is not None:
                name = f"job {holder.job!r} (host {holder.host}, pid {holder.pid}, {why})" \
                    if holder else f"an {why}"
                logger.warning("lease: taking over %s %s from %s", self.key, self.where, name)
                self._took(token)
                return
            # another job renewed or took it between our read and our write: judge again
        raise LeaseError(f"{self.key} {self.where}: the lease keeps changing; another job is "
                         "starting on it")

    def _took(self, token: Any) -> None:
        self.token = token
        self.renewed_t = self.me.renewed

    def renew(self) -> bool:
        """Write a fresh `renewed`. False when another job holds the lease now (`lost_to`).
        Raises LeaseError when the storage failed (the lease may still be ours)."""
        with self._lock:
            if self.token is None:  # released (or lost): nothing to renew, nothing to re-create
                return self.lost_to is None
            return self._renew()

    def _renew(self) -> bool:
        self.me = replace(self.me, renewed=time.time())
        mine = self.me.to_bytes()
        token = self._io("renew", lambda: self.store.replace(mine, self.token))
        if token is None:
            got = self._io("read", self.store.read)
            holder = Holder.parse(got[0]) if got else None
            if got is None:  # gone (a wiped bucket, a removed file) and taken by no one
                token = self._io("re-create", lambda: self.store.create(mine))
                if token is None:
                    return self._renew()  # someone created it meanwhile: judge that
                logger.warning("lease: %s %s had vanished; written again", self.key, self.where)
            elif holder is not None and holder.nonce == self.me.nonce:
                token = got[1]  # ours after all (our write landed, its answer did not)
            else:
                self.lost_to = holder or Holder("?", 0, "?", "", None, 0.0, 0.0, "")
                self.token = None
                return False
        self.token = token
        self.renewed_t = self.me.renewed
        return True

    def check(self) -> None:
        """Raise LeaseLost unless the stored lease is still ours (read now, not remembered)."""
        with self._lock:
            if self.lost_to is None:
                got = self._io("read", self.store.read)
                holder = Holder.parse(got[0]) if got else None
                if holder is not None and holder.nonce != self.me.nonce:
                    self.lost_to, self.token = holder, None
            if self.lost_to is not None:
                raise LeaseLost(self.lost_message())

    def lost_message(self) -> str:
        return (f"{self.key} {self.where} was taken over by {self.lost_to.describe()}; "
                "stopping without writing there")

    def release(self) -> None:
        """Delete the lease if it is still ours; never raises."""
        with self._lock:
            token, self.token = self.token, None
            if token is None:
                return
            try:
                self._io("delete", lambda: self.store.delete(token))
            except LeaseError as e:
                logger.warning("lease: not released (%s); it goes stale in %.0fs", e,
                               self.stale_s)


# ---- the job's leases and their renewal thread ---------------------------------------------

class Leases:
    """The leases of a run: `run.dir`'s, then `checkpoint.uri`'s, renewed by a thread. A context
    manager: leaving it stops the renewals and releases what is still ours."""

    def __init__(self, leases, renew_s: float = RENEW_S):
        self.leases = list(leases)
        self.renew_s = renew_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[Lease] = None  # the first lease found taken over

    def acquire(self) -> "Leases":
        taken = []
        try:
            for lease in self.leases:
                lease.acquire()
                taken.append(lease)
        except BaseException:
            for lease in taken:
                lease.release()
            raise
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal",
                                        daemon=True)
        self._thread.start()
        return self

    def lease(self, key: str) -> Lease:
        return next(l for l in self.leases if l.key == key)

    def _renew_loop(self) -> None:
        failing: Dict[str, bool] = {}  # key -> whether "may be taken over" was said yet
        while not self._stop.wait(self.renew_s):
            for lease in self.leases:
                try:
                    ok = lease.renew()
                except LeaseError as e:
                    age = time.time() - lease.renewed_t
                    warned_stale = failing.get(lease.key, False)
                    if lease.key not in failing or (age > lease.stale_s and not warned_stale):
                        logger.warning("lease: cannot renew (%s); last renewed %.0fs ago, another "
                                       "job may take it over after %.0fs", e, age, lease.stale_s)
                    failing[lease.key] = warned_stale or age > lease.stale_s
                    continue
                if failing.pop(lease.key, None) is not None:
                    logger.info("lease: %s %s renewed again", lease.key, lease.where)
                if not ok and self.lost is None:
                    self.lost = lease
                    logger.error("lease: %s", lease.lost_message())

    def check(self, key: str) -> None:
        """Raise LeaseLost if the lease `key` is another job's right now (a storage read), as
        before destructive writes such as checkpoint retention. A storage that does not answer
        is no proof of loss: logged, not raised."""
        lease = self.lease(key)
        try:
            lease.check()
        except LeaseLost:
            self.lost = self.lost or lease
            raise
        except LeaseError as e:
            logger.warning("lease: cannot check (%s)", e)

    def ours(self, key: str) -> bool:
        """Whether the lease `key` is still ours (read now; see `check`)."""
        try:
            self.check(key)
            return True
        except LeaseLost:
            return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CALL_TIMEOUT_S * 2 + 1)
        for lease in self.leases:
            lease.release()

    def __enter__(self) -> "Leases":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def leases_for(run_dir: str, checkpoint_uri: str, storage_options: Dict, job: str,
               renew_s: float = RENEW_S, **kwargs) -> Leases:
    """The (not yet acquired) leases of a run directory and its checkpoint location; `kwargs`
    go to each `Lease` (stale_s, ...)."""
    me = Holder.me(job, os.path.abspath(run_dir))
    return Leases([
        Lease(LocalStore(os.path.abspath(run_dir)), "run.dir", run_dir, me, **kwargs),
        Lease(store_for(checkpoint_uri, storage_options), "checkpoint.uri", checkpoint_uri, me,
              **kwargs),
    ], renew_s=renew_s)
