"""The checkpoint location's lease on a real S3 endpoint (moto's server): conditional create and
takeover, a lost lease, racing jobs, a restarted (emptied) endpoint, a frozen one, and the CLI
refusing a second job on the same checkpoint.uri."""

import os
import signal
import threading
import time

import pytest

from conftest import NO_CHAOS, ROOT, run_cli
from coordinator.lease import Holder, Lease, LeaseError, LeaseHeld, leases_for
from coordinator.lease_store import S3Store, store_for
from test_s3 import BUCKET, s3  # noqa: F401  (the moto server fixture)

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")


@pytest.fixture
def opts(s3, monkeypatch):  # noqa: F811
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    # The endpoint in the options: fsspec caches a filesystem per options, one per server.
    return {"client_kwargs": {"endpoint_url": s3.url}}


def _lease(uri, opts, job="me", host=None, **kw):
    me = Holder.me(job, "/runs/" + job)
    if host:
        me.host = host
    return Lease(store_for(uri, opts), "checkpoint.uri", uri, me, **kw)


def _stored(uri, opts):
    store = store_for(uri, opts)
    got = store.read()
    return Holder.parse(got[0]) if got else None


def test_conditional_create_refuse_release(opts):
    uri = f"s3://{BUCKET}/run one"
    first = _lease(uri, opts, "first")
    assert isinstance(first.store, S3Store)
    first.acquire()
    assert _stored(uri, opts).nonce == first.me.nonce
    # The endpoint itself refuses a second create (If-None-Match), not only our read.
    assert first.store.create(b"{}") is None and first.store.conditional
    with pytest.raises(LeaseHeld, match=rf"^checkpoint.uri {uri} is in use by job 'first' "
                                        r"\(host .*, pid \d+, since .*\); stop it first"):
        _lease(uri, opts, "second", host="node-2").acquire()
    first.release()
    assert _stored(uri, opts) is None
    _lease(uri, opts, "second", host="node-2").acquire()


def test_takeover_of_a_stale_lease_and_the_old_holder_finds_it_lost(opts):
    uri = f"s3://{BUCKET}/stale"
    old = _lease(uri, opts, "old", host="node-1", stale_s=0.5)
    old.acquire()
    time.sleep(0.8)
    new = _lease(uri, opts, "new", host="node-2", stale_s=0.5)
    new.acquire()
    assert _stored(uri, opts).job == "new"
    # The old holder wakes up: its If-Match on the old ETag fails, the lease is not its own.
    assert old.renew() is False and old.lost_to.job == "new"
    old.release()  # deletes nothing: not ours
    assert _stored(uri, opts).job == "new"
    assert new.renew() is True


def test_racing_jobs_one_wins(opts):
    uri = f"s3://{BUCKET}/race"
    leases = [_lease(uri, opts, f"j{i}", host=f"node-{i}") for i in range(6)]
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
        t.join(60)
    assert len(won) == 1 and len(refused) == 5
    assert _stored(uri, opts).nonce == won[0].me.nonce


def test_an_emptied_endpoint_gets_the_lease_written_again(s3, opts):  # noqa: F811
    uri = f"s3://{BUCKET}/restart"
    lease = _lease(uri, opts)
    lease.acquire()
    s3.kill()
    s3.start()  # moto keeps nothing: the bucket is back, empty
    deadline = time.monotonic() + 30
    while True:
        try:
            assert lease.renew()
            break
        except LeaseError:  # the first call may meet the dead server's pooled connection
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert _stored(uri, opts).nonce == lease.me.nonce


def test_a_frozen_endpoint_costs_the_bound_not_minutes(s3, opts):  # noqa: F811
    uri = f"s3://{BUCKET}/frozen"
    os.kill(s3.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(LeaseError, match="the storage did not answer within 2s"):
            _lease(uri, opts, timeout_s=2.0).acquire()
        assert time.monotonic() - t0 < 5
    finally:
        os.kill(s3.proc.pid, signal.SIGCONT)


def test_the_cli_refuses_a_second_job_on_the_same_checkpoint_uri(s3, opts, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/shared ckpt"
    holder = leases_for(str(tmp_path / "first"), uri, opts, "first").acquire()
    try:
        t0 = time.monotonic()
        second = run_cli(["run", CONFIG, NO_CHAOS, f"checkpoint.uri={uri}",
                          f"run.dir={tmp_path / 'second'}"], env=s3.env, timeout=120)
        took = time.monotonic() - t0
    finally:
        holder.close()
    assert second.returncode == 2, second.stdout + second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint.uri {uri} is in use by "
                                                   "job 'first' (host "), second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert sorted(os.listdir(tmp_path / "second")) == ["lease.json.lock"], "nothing written"
    assert took < 30, took
