"""Storage that fails under a save, on the real thing: a tmpfs that fills up (ENOSPC), the same
mount remounted read-only, a directory the writer may not write (EACCES), in one process (a
world of 1 on gloo); and the error classifier on the exceptions those produce."""

import errno
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, remount, tmpfs
from coordinator.checkpoint import errors
from coordinator.checkpoint import manifest as mf
from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.saver import CheckpointSaver, load_checkpoint
from coordinator.events import EventLog, events_of
from train.state import build_state, checkpoint_state, load_template
from train.task import make_task

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def state():
    return build_state(make_task("train.tasks.gpt:TinyGPT", {}), "ddp", torch.device("cpu"), 0,
                       100)


def _save(saver, st, step):
    st.step = step
    t0 = time.time()
    saver.save(step, checkpoint_state(st, 0))
    saver.wait()
    return saver.reports[-1], time.time() - t0


def _all_committed_load(uri, st):
    """Every committed checkpoint passes --verify and loads (a checkpoint short of a shard's
    entries would verify and fail here)."""
    infos = [c for c in mf.list_checkpoints(uri, {}, verify=True)]
    for ci in infos:
        assert ci.status in ("committed", "incomplete"), (ci.step, ci.status, ci.reason)
        if ci.status == "committed":
            load_checkpoint(ci.path, {}, lambda saved: load_template(st, 0, saved), None)
    return [c.step for c in infos if c.status == "committed"]


def test_a_full_disk_fails_fast_in_words_and_saves_resume_when_space_returns(
        world1, state, tmp_path):
    mnt = tmp_path / "small disk"
    with tmpfs(mnt, "6m"):
        uri = str(mnt / "ck")
        log = tmp_path / "logs" / "checkpoint-errors.log"
        c = Committer(uri, {}, 2, True, "h", EventLog(str(tmp_path / "events.jsonl")),
                      log_path=str(log))
        saver = CheckpointSaver(uri, {}, True, 0, world1)
        rep, _ = _save(saver, state, 10)
        c.on_save(rep)
        assert c.committed == [10]
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # leave less than a checkpoint's worth
            f.write(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize - 200_000))
        for step in (20, 30):
            rep, took = _save(saver, state, step)
            c.on_save(rep)
            # One attempt, no backoff: a full disk does not heal within a retry's wait.
            assert not rep.ok and rep.attempts == 1, (rep.attempts, rep.error)
            assert rep.error == f"no space left on device: {uri}/step-000000{step}", rep.error
            # The failed step's files are gone; the disk is as full as before it.
            assert not os.path.exists(f"{uri}/step-000000{step}")
        failed = events_of(str(tmp_path / "events.jsonl"), "checkpoint_failed")
        assert [e["step"] for e in failed] == [20, 30]
        assert failed[0]["reason"].startswith("no space left on device: ")
        assert "Traceback" in log.read_text() and "step 20 not committed" in log.read_text()
        c.retain()  # retention never deletes the newest committed checkpoint
        assert _all_committed_load(uri, state) == [10]
        os.remove(filler)  # space returns
        for step in (40, 50):
            rep, _ = _save(saver, state, step)
            c.on_save(rep)
            assert rep.ok, rep.error
        saver.close()
        assert c.committed == [10, 40, 50]
        assert _all_committed_load(uri, state) == [40, 50]


def test_a_read_only_mount_fails_without_retry_and_saves_resume_rw(world1, state, tmp_path):
    mnt = tmp_path / "disk"
    with tmpfs(mnt, "8m"):
        uri = str(mnt / "ck")
        c = Committer(uri, {}, 2, True, "h", EventLog(str(tmp_path / "events.jsonl")))
        saver = CheckpointSaver(uri, {}, True, 0, world1)
        rep, _ = _save(saver, state, 1)
        c.on_save(rep)
        remount(mnt, "ro")
        rep, took = _save(saver, state, 2)
        c.on_save(rep)
        assert not rep.ok and rep.attempts == 1, (rep.attempts, rep.error)
        assert rep.error == f"read-only file system: {uri}/step-00000002", rep.error
        remount(mnt, "rw")
        rep, _ = _save(saver, state, 3)
        c.on_save(rep)
        saver.close()
        assert c.committed == [1, 3] and c.failed == [2]
        assert _all_committed_load(uri, state) == [1, 3]


_DENIED = r"""
import sys, torch, torch.distributed as dist
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import free_port
from coordinator.checkpoint.saver import CheckpointSaver
from train.state import build_state, checkpoint_state
from train.task import make_task
store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
st = build_state(make_task("train.tasks.gpt:TinyGPT", {{}}), "ddp", torch.device("cpu"), 0, 10)
saver = CheckpointSaver({uri!r}, {{}}, True, 0, dist.new_group(backend="gloo"))
saver.save(1, checkpoint_state(st, 0))
saver.close()
rep = saver.reports[-1]
print("REPORT", rep.ok, rep.attempts, rep.error)
"""


def test_a_directory_the_writer_may_not_write_is_a_permission_error(tmp_path):
    """A real EACCES: a directory without write permission. Root passes permission checks, so
    as root the writer runs without CAP_DAC_OVERRIDE (setpriv), as an unprivileged user would."""
    uri = tmp_path / "locked"
    uri.mkdir()
    uri.chmod(0o555)
    script = _DENIED.format(root=ROOT, tests=os.path.join(ROOT, "tests"), uri=str(uri / "ck"))
    cmd = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    line = next((l for l in out.stdout.splitlines() if l.startswith("REPORT")), None)
    assert line is not None, out.stdout + out.stderr
    assert line == f"REPORT False 1 permission denied: {uri / 'ck'}", line
    assert "Traceback" not in out.stderr, out.stderr  # nothing raw on the terminal


# ---- the classifier on real exceptions ---------------------------------------------------------

def _raised(fn):
    try:
        fn()
    except BaseException as e:  # noqa: B036 - CheckpointException is a BaseException
        return e
    raise AssertionError("did not raise")


def test_the_classifier_walks_chains_and_dcp_failures(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    def short_write():  # what torch's zip writer raises over an ENOSPC from below
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "704 vs 598")

    e = _raised(short_write)
    assert errors.classify(e, "/ck/step-1").words == "no space left on device: /ck/step-1"
    # The chain lost (pickled between ranks): torch's words alone still say a short write.
    bare = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    got = errors.classify(bare, "/ck/step-1")
    assert got.kind == errors.DISK_FULL and not got.retryable
    gone = _raised(lambda: open(tmp_path / "no" / "such" / "dir", "w"))
    got = errors.classify(gone)
    assert got.kind == errors.NOT_FOUND and "vanished" in got.words and not got.retryable
    wrapped = CheckpointException("write", {1: _wrap_exception(errors.StorageError(
        errors.DISK_FULL, "no space left on device: /x")), 0: _wrap_exception(ValueError("y"))})
    assert errors.classify(wrapped).words == "no space left on device: /x"
    other = errors.classify(_raised(lambda: 1 / 0))
    assert other.kind == errors.OTHER and other.retryable and "ZeroDivisionError" in other.words
    # It crosses ranks (DCP pickles it) and Ray (the report) with its words.
    back = pickle.loads(pickle.dumps(errors.StorageError(errors.READ_ONLY, "read-only: /x")))
    assert (back.kind, back.words, back.retryable, str(back)) == (
        errors.READ_ONLY, "read-only: /x", False, "read-only: /x")


def test_the_classifier_reads_s3_codes():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    def boto(code):
        return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")

    for code, kind in [("AccessDenied", errors.PERMISSION), ("NoSuchBucket", errors.NOT_FOUND)]:
        got = errors.classify(translate_boto_error(boto(code)), "s3://b/ck")
        assert got.kind == kind and f"({code}): s3://b/ck" in got.words and not got.retryable
    down = errors.classify(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert down.kind == errors.UNREACHABLE and down.retryable and "unreachable" in down.words
