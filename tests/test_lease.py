"""The run's leases on local paths and memory://: taken, refused to a live holder, taken over from
a dead or silent one, lost to a takeover, bounded when the storage does not answer. The holders
are real processes (a live one, a SIGKILLed one, a SIGSTOPped one)."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from coordinator.lease import Holder, Lease, LeaseError, LeaseHeld, LeaseLost, leases_for
from coordinator.lease_store import FsspecStore, LocalStore, store_for

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# A job's leases in a process of its own: prints "held", then exits 3 once it finds a lease
# taken over (what the runner does).
HOLDER = """
import logging, sys, time
from coordinator.lease import leases_for
run_dir, uri, stale, renew = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
leases = leases_for(run_dir, uri, {}, "holder", renew_s=renew, stale_s=stale).acquire()
print("held", flush=True)
while leases.lost is None:
    time.sleep(0.05)
print("lost:", leases.lost.lost_message(), flush=True)
leases.close()
sys.exit(3)
"""


@pytest.fixture
def holder_proc():
    procs = []

    def start(run_dir, uri=None, stale=30.0, renew=5.0):
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir),
                              str(uri or os.path.join(run_dir, "checkpoints")), str(stale),
                              str(renew)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held", p.communicate(timeout=10)[0]
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait(timeout=10)


@pytest.fixture
def lease_log():
    """The lease's log lines (attached to its logger: the CLI's set-up stops propagation)."""
    lines = []

    class H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("coordinator.lease")
    h, level = H(), log.level
    log.addHandler(h)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(h)
    log.setLevel(level)


def _record(path):
    with open(os.path.join(path, "lease.json")) as f:
        return json.load(f)


def _foreign(path, **fields):
    """A lease left by a job on another host (written as that job would have)."""
    h = Holder.me("other", "/elsewhere")
    h.host, h.pid = "node-17", 4242
    for k, v in fields.items():
        setattr(h, k, v)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "lease.json"), "wb") as f:
        f.write(h.to_bytes())
    return h


def _lease(path, job="me", **kw):
    return Lease(LocalStore(str(path)), "run.dir", str(path), Holder.me(job, str(path)), **kw)


def test_acquire_writes_the_record_and_release_deletes_it(tmp_path):
    run_dir = tmp_path / "run dir with 'quotes'"
    leases = leases_for(str(run_dir), str(run_dir / "checkpoints"), {}, "local_cpu").acquire()
    rec = _record(run_dir)
    assert rec["pid"] == os.getpid() and rec["job"] == "local_cpu"
    assert rec["run_dir"] == str(run_dir) and rec["renewed"] >= rec["started"] > time.time() - 10
    assert _record(run_dir / "checkpoints")["nonce"] == rec["nonce"]
    leases.close()
    assert not (run_dir / "lease.json").exists()
    assert not (run_dir / "checkpoints" / "lease.json").exists()


def test_a_live_holder_is_refused_in_one_line(tmp_path, holder_proc):
    run_dir = tmp_path / "run"
    p = holder_proc(run_dir)
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld) as e:
        leases_for(str(run_dir), str(tmp_path / "other ckpt"), {}, "second").acquire()
    assert time.monotonic() - t0 < 2
    msg = str(e.value)
    assert msg.startswith(f"run.dir {run_dir} is in use by job 'holder' (host ")
    assert f"pid {p.pid}, since " in msg and "set run.dir to another directory" in msg
    assert "\n" not in msg
    assert _record(run_dir)["pid"] == p.pid, "the holder's lease is untouched"
    assert not (tmp_path / "other ckpt" / "lease.json").exists(), "nothing taken when refused"


def test_the_checkpoint_uri_is_refused_and_the_run_dir_lease_given_back(tmp_path, holder_proc):
    uri = tmp_path / "shared ckpt"
    holder_proc(tmp_path / "first", uri=uri)
    with pytest.raises(LeaseHeld, match=r"^checkpoint.uri .* is in use by job 'holder'.*"
                                        r"set checkpoint.uri to another location$"):
        leases_for(str(tmp_path / "second"), str(uri), {}, "second").acquire()
    assert not (tmp_path / "second" / "lease.json").exists()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, holder_proc, lease_log):
    run_dir = tmp_path / "run"
    p = holder_proc(run_dir)
    p.kill()
    p.wait(timeout=10)
    lease = _lease(run_dir)
    t0 = time.monotonic()
    lease.acquire()
    assert time.monotonic() - t0 < 2
    assert _record(run_dir)["pid"] == os.getpid()
    assert lease_log == [f"lease: taking over run.dir {run_dir} from job 'holder' "
                         f"(host {Holder.me('x', '').host}, pid {p.pid}, gone)"]
    lease.release()


def test_a_silent_holder_elsewhere_is_taken_over_once_stale(tmp_path, lease_log):
    run_dir = tmp_path / "run"
    _foreign(run_dir, renewed=time.time() - 3)  # live on another host, 3 s ago
    with pytest.raises(LeaseHeld, match=r"job 'other' \(host node-17, pid 4242, since"):
        _lease(run_dir, stale_s=30).acquire()
    _foreign(run_dir, renewed=time.time() - 45)
    _lease(run_dir, stale_s=30).acquire()
    assert _record(run_dir)["pid"] == os.getpid()
    assert lease_log[-1].endswith("from job 'other' (host node-17, pid 4242, "
                                  "not renewed for 45s)")


@pytest.mark.parametrize("content", [b"", b'{"host": "n', b"[]", b"\x00\xff garbage"],
                         ids=["empty", "truncated", "not-a-record", "binary"])
def test_an_unreadable_lease_is_taken_over(tmp_path, content, lease_log):
    (tmp_path / "lease.json").write_bytes(content)
    _lease(tmp_path).acquire()
    assert _record(tmp_path)["pid"] == os.getpid()
    assert lease_log == [f"lease: taking over run.dir {tmp_path} from an unreadable lease.json"]


def test_a_frozen_holder_loses_its_lease_and_stops(tmp_path, holder_proc, lease_log):
    """SIGSTOP the holder past the stale time: another job takes over; woken up, the holder's
    next renewal finds the lease gone to someone else and it exits 3 without deleting it."""
    run_dir = tmp_path / "run"
    p = holder_proc(run_dir, stale=1.0, renew=0.2)
    os.kill(p.pid, signal.SIGSTOP)
    time.sleep(1.5)
    taker = leases_for(str(run_dir), str(run_dir / "checkpoints"), {}, "taker", stale_s=1.0)
    taker.acquire()
    assert "not renewed for" in lease_log[0]
    os.kill(p.pid, signal.SIGCONT)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 3, out
    assert f"lost: run.dir {run_dir} was taken over by job 'taker'" in out
    assert _record(run_dir)["job"] == "taker", "the loser left the taker's lease alone"
    taker.close()


def test_renewal_rewrites_renewed_and_a_lost_lease_is_not_released(tmp_path):
    run_dir = tmp_path / "run"
    leases = leases_for(str(run_dir), str(run_dir / "ck"), {}, "me", renew_s=0.1).acquire()
    first = _record(run_dir)["renewed"]
    time.sleep(0.5)
    assert _record(run_dir)["renewed"] > first
    other = _foreign(run_dir)  # another job overwrote it (as a takeover does)
    deadline = time.monotonic() + 5
    while leases.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leases.lost is not None and leases.lost.key == "run.dir"
    with pytest.raises(LeaseLost, match="was taken over by job 'other' .host node-17"):
        leases.check("run.dir")
    assert not leases.ours("run.dir") and leases.ours("checkpoint.uri")
    leases.close()
    assert _record(run_dir)["nonce"] == other.nonce
    assert not (run_dir / "ck" / "lease.json").exists()


def test_a_vanished_lease_is_written_again_on_renewal(tmp_path, lease_log):
    lease = _lease(tmp_path)
    lease.acquire()
    os.unlink(tmp_path / "lease.json")
    assert lease.renew()
    assert _record(tmp_path)["nonce"] == lease.me.nonce
    assert lease_log[-1] == f"lease: run.dir {tmp_path} had vanished; written again"


def test_a_slurm_requeue_waits_for_its_previous_run_to_go_stale(tmp_path, monkeypatch,
                                                                 lease_log):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    _foreign(tmp_path, slurm_job_id="7", renewed=time.time())
    t0 = time.monotonic()
    _lease(tmp_path, stale_s=1.0, requeue_grace_s=5.0).acquire()
    waited = time.monotonic() - t0
    assert 0.9 < waited < 4, waited
    assert "held by the previous run of SLURM job 7 (host node-17, pid 4242)" in lease_log[0]
    assert "not renewed for" in lease_log[-1]
    # another SLURM job is refused at once
    _foreign(tmp_path / "b", slurm_job_id="8", renewed=time.time())
    t0 = time.monotonic()
    with pytest.raises(LeaseHeld, match="SLURM job 8"):
        _lease(tmp_path / "b", stale_s=1.0).acquire()
    assert time.monotonic() - t0 < 0.5


def test_a_storage_that_does_not_answer_is_given_up_on(tmp_path):
    """A FIFO as lease.json: opening it blocks like a hung mount. The call is bounded."""
    os.mkfifo(tmp_path / "lease.json")
    t0 = time.monotonic()
    try:
        with pytest.raises(LeaseError, match=r"read lease.json: the storage did not answer "
                                             r"within 1s"):
            _lease(tmp_path, timeout_s=1.0).acquire()
        assert time.monotonic() - t0 < 3
    finally:  # let the blocked reader go
        fd = os.open(tmp_path / "lease.json", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)


def test_two_jobs_racing_for_a_free_lease_one_wins(tmp_path):
    leases = [_lease(tmp_path, job=f"j{i}") for i in range(8)]
    won, refused = [], []
    barrier = threading.Barrier(len(leases))

    def go(lease):
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(lease)
    threads = [threading.Thread(target=go, args=(l,)) for l in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(won) == 1 and len(refused) == 7
    assert _record(tmp_path)["nonce"] == won[0].me.nonce


def test_memory_uri_lease_refuses_and_releases():
    uri = "memory://lease-test/ckpt"
    first = Lease(store_for(uri, {}), "checkpoint.uri", uri, Holder.me("a", "/a"))
    assert isinstance(first.store, FsspecStore)
    first.acquire()
    other = Holder.me("b", "/b")
    other.host = "node-2"
    with pytest.raises(LeaseHeld, match="job 'a'"):
        Lease(store_for(uri, {}), "checkpoint.uri", uri, other).acquire()
    first.release()
    Lease(store_for(uri, {}), "checkpoint.uri", uri, other).acquire()


def test_the_committer_neither_commits_nor_deletes_once_the_lease_is_lost(tmp_path):
    from coordinator.checkpoint.committer import Committer
    from coordinator.events import EventLog
    from coordinator.protocol import SaveReport

    def lost():
        raise LeaseLost("checkpoint.uri x was taken over by job 'b'")
    c = Committer(str(tmp_path), {}, 2, False, "h", EventLog(str(tmp_path / "ev.jsonl")),
                  guard=lost)
    with pytest.raises(LeaseLost):
        c.on_save(SaveReport(step=5, rank=0, ok=True, files={}))
    assert not (tmp_path / "step-00000005").exists() and c.committed == []
    with pytest.raises(LeaseLost):
        c.retain()
