"""Checkpoints in one process (a world of 1 on gloo): commit, torn checkpoints, fallback,
retention, torch's own tools."""

import json
import os
import time

import pytest
import torch

from conftest import run_cli
from coordinator.checkpoint import manifest as mf
from coordinator.checkpoint.committer import Committer
from coordinator.checkpoint.faults import StorageOutage
from coordinator.checkpoint.saver import CheckpointSaver, load_checkpoint
from coordinator.checkpoint.storage import file_checksum, filesystem, hash_file, join
from coordinator.events import EventLog, events_of
from train import data as data_lib
from train.loop import run_steps
from train.state import (apply_loaded, build_state, checkpoint_state, full_model_state,
                         load_template, weights_digest)
from train.step import train_step
from train.task import make_task

pytestmark = pytest.mark.unit


def _trained(steps, task="train.tasks.gpt:TinyGPT"):
    t = make_task(task, {})
    st = build_state(t, "ddp", torch.device("cpu"), 0, 100)
    run_steps(st, seed=0, global_batch_size=8, world_size=1, rank=0, device=torch.device("cpu"),
              until_step=steps)
    return t, st


def _save(uri, st, group, step, committer, async_=True):
    saver = CheckpointSaver(uri, {}, async_, 0, group)
    st.step = step
    saver.save(step, checkpoint_state(st, 0))
    saver.close()
    for rep in saver.reports:
        committer.on_save(rep)
    return saver.reports


def _committer(uri, tmp_path, keep=3, verify=True):
    return Committer(uri, {}, keep, verify, "hash0", EventLog(str(tmp_path / "events.jsonl")))


def test_commit_resume_exact_on_a_hostile_path(world1, tmp_path):
    uri = str(tmp_path / "ckpt dir with 'quotes' and spaces")
    t, st = _trained(5)
    reports = _save(uri, st, world1, 5, _committer(uri, tmp_path))
    assert reports[0].ok and reports[0].stall_s < 5
    (ci,) = mf.list_checkpoints(uri, {}, verify=True)
    assert ci.status == "committed" and ci.world_size == 1 and ci.step == 5
    # The hashes taken on the way out equal a read-back of what landed.
    fs, root = filesystem(uri, {})
    assert ci.manifest["hash"] == "crc32c"  # the default
    for name, meta in ci.manifest["files"].items():
        assert hash_file(fs, join(root, "step-00000005", name), "crc32c") == meta["crc32c"]
    assert ".metadata" in ci.manifest["files"] and ci.manifest["config_hash"] == "hash0"
    # Restore into a fresh state: equal weights, step, scheduler, and the next step agrees.
    t2 = make_task("train.tasks.gpt:TinyGPT", {})
    st2 = build_state(t2, "ddp", torch.device("cpu"), 1, 100)  # other seed: other init
    sd = load_checkpoint(ci.path, {}, lambda saved: load_template(st2, 0, saved), world1)
    apply_loaded(st2, sd, 0)
    assert st2.step == 5 and st2.scheduler.last_epoch == st.scheduler.last_epoch
    assert weights_digest(full_model_state(st2)) == weights_digest(full_model_state(st))
    for s in (st, st2):
        train_step(s.model, s.optimizer, s.scheduler, t.loss,
                   data_lib.local_batch(t, 0, 5, 8, 1, 0), 1.0)
    assert weights_digest(full_model_state(st2)) == weights_digest(full_model_state(st))


def test_memory_uri(world1, tmp_path):
    uri = "memory://ckpt-test/run1"
    _, st = _trained(2)
    _save(uri, st, world1, 2, _committer(uri, tmp_path), async_=False)
    chosen, skipped = mf.resolve_latest(uri, {}, verify=True)
    assert chosen.step == 2 and not skipped


def _three_checkpoints(world1, tmp_path):
    uri = str(tmp_path / "ck")
    _, st = _trained(3)
    c = _committer(uri, tmp_path, keep=5)
    for step in (10, 20, 30):
        _save(uri, st, world1, step, c)
    return uri, join(uri, "step-00000030")


def _shard(path):
    return join(path, sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0])


@pytest.mark.parametrize("damage, status, needs_verify", [
    ("missing_manifest", "incomplete", False),
    ("torn_manifest", "corrupt", False),
    ("truncated_shard", "corrupt", False),
    ("missing_shard", "corrupt", False),
    ("flipped_byte", "corrupt", True),
])
def test_torn_checkpoints_are_flagged_and_skipped(world1, tmp_path, damage, status, needs_verify):
    uri, newest = _three_checkpoints(world1, tmp_path)
    if damage == "missing_manifest":
        os.remove(join(newest, "manifest.json"))
    elif damage == "torn_manifest":
        with open(join(newest, "manifest.json"), "r+") as f:
            f.truncate(40)
    elif damage == "truncated_shard":
        with open(_shard(newest), "r+b") as f:
            f.truncate(100)
    elif damage == "missing_shard":
        os.remove(_shard(newest))
    elif damage == "flipped_byte":
        _flip(_shard(newest))
    infos = {ci.step: ci for ci in mf.list_checkpoints(uri, {}, verify=True)}
    assert infos[30].status == status and infos[20].status == "committed"
    unverified = {ci.step: ci for ci in mf.list_checkpoints(uri, {}, verify=False)}
    assert (unverified[30].status == "committed") == needs_verify
    chosen, skipped = mf.resolve_latest(uri, {}, verify=True)
    assert chosen.step == 20 and [s.step for s in skipped] == [30] and skipped[0].reason
    proc = run_cli(["inspect", uri, "--verify"], timeout=60)
    assert proc.returncode == (1 if status == "corrupt" else 0), proc.stdout + proc.stderr
    assert status in proc.stdout
    if needs_verify:  # without --verify, sizes match: nothing to flag
        assert run_cli(["inspect", uri], timeout=60).returncode == 0


def _flip(path, at=500):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_sha256_and_manifests_from_before_the_hash_setting_load_and_verify(world1, tmp_path):
    uri = str(tmp_path / "ckpt")
    _, st = _trained(2)
    saver = CheckpointSaver(uri, {}, True, 0, world1, hash_name="sha256")
    st.step = 4
    saver.save(4, checkpoint_state(st, 0))
    saver.close()
    c = _committer(uri, tmp_path)
    c.on_save(saver.reports[0])
    (ci,) = mf.list_checkpoints(uri, {}, verify=True)
    assert ci.status == "committed" and ci.manifest["hash"] == "sha256"
    fs, root = filesystem(uri, {})
    for name, meta in ci.manifest["files"].items():
        assert file_checksum(meta) == ("sha256", hash_file(fs, join(root, "step-00000004", name),
                                                           "sha256"))
    # A manifest written before checkpoint.hash existed names no algorithm: sha256 it is.
    path = join(uri, "step-00000004", "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    del manifest["hash"]
    with open(path, "w") as f:
        json.dump(manifest, f)
    (ci,) = mf.list_checkpoints(uri, {}, verify=True)
    assert ci.status == "committed"
    _flip(_shard(join(uri, "step-00000004")))
    (ci,) = mf.list_checkpoints(uri, {}, verify=True)
    assert ci.status == "corrupt" and "fails its sha256 check" in ci.reason
    # An entry without a checksum is no manifest of ours.
    manifest["files"][".metadata"].pop("sha256")
    with open(path, "w") as f:
        json.dump(manifest, f)
    (ci,) = mf.list_checkpoints(uri, {}, verify=False)
    assert ci.status == "corrupt" and ".metadata no checksum" in ci.reason


def test_crc32c_of_chunked_views_is_the_standard_one():
    from coordinator.checkpoint import storage
    h = storage.new_hash("crc32c")
    h.update(b"1234")
    h.update(memoryview(bytearray(b"56789")))
    assert h.hexdigest() == "e3069283"  # the CRC-32C check value (RFC 3720)
    big = bytearray(os.urandom(3 * (1 << 20) + 17))
    import google_crc32c
    for view in (memoryview(big).toreadonly(), memoryview(big), big):  # copied, in place
        h = storage.new_hash("crc32c")
        h.update(view)
        assert h.hexdigest() == f"{google_crc32c.value(bytes(big)):08x}"


def test_a_bad_hash_name_fails_at_once(world1, tmp_path):
    with pytest.raises(ValueError, match="checkpoint.hash='md5'"):
        CheckpointSaver(str(tmp_path / "c"), {}, True, 0, world1, hash_name="md5")
    from coordinator import config
    from coordinator.checkpoint import storage
    assert config.HASHES == storage.HASHES  # config's copy (it imports no fsspec)
    assert config.CheckpointConfig().hash == storage.HASHES[0]


def test_committer_falls_back_and_logs_why(world1, tmp_path):
    uri, newest = _three_checkpoints(world1, tmp_path)
    os.remove(_shard(newest))
    c = _committer(uri, tmp_path)
    chosen = c.resolve_resume()
    assert chosen.step == 20 and c.protected == {20}
    (skip,) = events_of(str(tmp_path / "events.jsonl"), "checkpoint_skipped")
    assert skip["step"] == 30 and "missing" in skip["reason"]


def test_retention_keeps_the_newest_and_the_protected(world1, tmp_path):
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    c = _committer(uri, tmp_path, keep=2)
    c.protected.add(10)
    for step in (10, 20, 30, 40):
        _save(uri, st, world1, step, c)
    assert mf.list_steps(uri, {}) == [10, 30, 40]
    committed = events_of(str(tmp_path / "events.jsonl"), "checkpoint_committed")
    assert [e["step"] for e in committed] == [10, 20, 30, 40]
    e = committed[-1]
    assert e["bytes"] > 0 and e["persist_s"] > 0 and e["stall_s"] >= 0
    assert e["uri"].endswith("/step-00000040")


def test_only_the_newest_restore_is_protected_from_retention(world1, tmp_path):
    """A job that restores again and again (each rollback, each lost FSDP2 shard) keeps
    checkpoint.keep checkpoints plus the one it restored last, not every one it restored."""
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    c = _committer(uri, tmp_path, keep=2)
    for step in (10, 20):
        _save(uri, st, world1, step, c)
    assert c.resolve_resume().step == 20 and c.protected == {20}
    for step in (30, 40):
        _save(uri, st, world1, step, c)
    assert c.resolve_resume().step == 40 and c.protected == {40}
    _save(uri, st, world1, 50, c)
    assert mf.list_steps(uri, {}) == [40, 50]


def test_retention_victims():
    def ci(step, status):
        return mf.CheckpointInfo(step, f"p{step}", status)

    infos = [ci(1, "committed"), ci(2, "incomplete"), ci(3, "committed"), ci(4, "committed"),
             ci(5, "corrupt"), ci(6, "committed"), ci(7, "incomplete")]
    assert mf.retention_victims(infos, 2, set()) == [1, 2, 3, 5]
    assert mf.retention_victims(infos, 2, {3}) == [1, 2, 5]
    assert mf.retention_victims([ci(1, "incomplete")], 2, set()) == []


def test_a_failed_delete_does_not_stop_anything(world1, tmp_path, monkeypatch):
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    c = _committer(uri, tmp_path, keep=2)

    def refuse(*a, **k):
        raise PermissionError("read-only bucket")

    monkeypatch.setattr(mf, "delete_checkpoint", refuse)
    for step in (10, 20, 30):
        _save(uri, st, world1, step, c)
    assert c.committed == [10, 20, 30] and mf.list_steps(uri, {}) == [10, 20, 30]


def test_failed_persist_is_reported_and_never_committed(world1, tmp_path):
    uri = str(tmp_path / "ck")
    os.makedirs(uri)
    blocker = join(uri, "step-00000010")
    with open(blocker, "w") as f:  # a file where the step directory must go
        f.write("x")
    _, st = _trained(1)
    saver = CheckpointSaver(uri, {}, True, 0, world1, retries=2, backoff_s=0.01)
    c = _committer(uri, tmp_path)
    saver.save(10, checkpoint_state(st, 0))
    saver.close()
    (rep,) = saver.reports
    assert not rep.ok and rep.attempts == 2
    assert rep.error.startswith("FileExistsError: [Errno 17] File exists"), rep.error
    c.on_save(rep)
    (failed,) = events_of(str(tmp_path / "events.jsonl"), "checkpoint_failed")
    assert failed["step"] == 10 and "could not persist" in failed["reason"]
    assert c.committed == []


def test_torch_dcp_to_torch_save_reads_our_checkpoint(world1, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    uri = str(tmp_path / "ck")
    _, st = _trained(2)
    _save(uri, st, world1, 2, _committer(uri, tmp_path))
    out = str(tmp_path / "full.pt")
    dcp_to_torch_save(join(uri, "step-00000002"), out)
    sd = torch.load(out, weights_only=True)
    full = full_model_state(st)
    assert set(sd["model"]) == set(full)
    for k, v in full.items():
        assert torch.equal(sd["model"][k], v)
    assert int(sd["extra"]["step"]) == 2 and "rng/rank0" in sd


def test_rewriting_a_step_uncommits_it_first(world1, tmp_path):
    """A step saved again (e.g. after a resume from an older one) loses its old manifest before
    any shard is overwritten: a half-rewritten directory is never taken as committed."""
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    _save(uri, st, world1, 10, _committer(uri, tmp_path))
    assert os.path.exists(join(uri, "step-00000010", "manifest.json"))
    saver = CheckpointSaver(uri, {}, False, 0, world1)
    saver.save(10, checkpoint_state(st, 0))  # not handed to the committer
    saver.close()
    assert saver.reports[0].ok
    assert not os.path.exists(join(uri, "step-00000010", "manifest.json"))
    assert mf.list_checkpoints(uri, {})[0].status == "incomplete"


def test_a_save_due_while_one_persists_waits_for_it(world1, tmp_path, monkeypatch):
    """At most one save in flight: the second waits (and says so), both commit."""
    import coordinator.checkpoint.saver as saver_mod

    real_save = saver_mod.dcp.save

    def slow_save(*args, **kwargs):
        time.sleep(0.6)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(saver_mod.dcp, "save", slow_save)
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    c = _committer(uri, tmp_path)
    saver = CheckpointSaver(uri, {}, True, 0, world1)
    saver.save(1, checkpoint_state(st, 0))
    t0 = time.time()
    saver.save(2, checkpoint_state(st, 0))
    assert time.time() - t0 >= 0.3, "the second save waited for the first"
    saver.close()
    first, second = saver.reports
    assert first.waited_s == 0 and second.waited_s >= 0.3 and second.stall_s >= second.waited_s
    for rep in (first, second):
        c.on_save(rep)
    assert c.committed == [1, 2]
    (wait,) = events_of(str(tmp_path / "events.jsonl"), "checkpoint_wait")
    assert wait["step"] == 2 and wait["waited_s"] >= 0.3


def test_a_background_commit_never_holds_the_driver_on_a_stuck_storage(world1, tmp_path):
    """background=True: on_save and poll return at once while the manifest write hangs (a
    storage that stopped answering); the commit is announced by the poll after it finished,
    drain waits for the last one, and a lease guard's error still reaches the driver."""
    import threading

    from coordinator.lease import LeaseLost

    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    saver = CheckpointSaver(uri, {}, True, 0, world1)
    for step in (1, 2):
        saver.save(step, checkpoint_state(st, 0))
    saver.close()
    first, second = saver.reports
    answer = threading.Event()
    c = Committer(uri, {}, 3, True, "hash0", EventLog(str(tmp_path / "events.jsonl")),
                  fault=lambda: answer.wait(30), background=True)
    t0 = time.monotonic()
    c.on_save(first)
    c.poll()
    assert time.monotonic() - t0 < 1 and c.committed == []
    assert events_of(str(tmp_path / "events.jsonl"), "checkpoint_committed") == []
    c.drain(0.2)  # still stuck: drain gives up in its bound, nothing committed
    assert c.committed == [] and not os.path.exists(join(uri, "step-00000001", mf.MANIFEST))
    answer.set()
    c.on_save(second)
    c.drain(30)
    assert c.committed == [1, 2]
    assert [e["step"] for e in events_of(str(tmp_path / "events.jsonl"),
                                         "checkpoint_committed")] == [1, 2]
    assert [x.step for x in mf.list_checkpoints(uri, {}, verify=True)] == [1, 2]

    def lost():
        raise LeaseLost("checkpoint.uri x was taken over by job 'b'")
    guarded = Committer(uri, {}, 3, True, "hash0", EventLog(str(tmp_path / "ev2.jsonl")),
                        guard=lost, background=True)
    guarded.on_save(first)
    with pytest.raises(LeaseLost):
        guarded.drain(30)


def test_an_injected_outage_fails_saves_and_commits_only_where_it_is_passed(world1, tmp_path):
    """The storage_outage fault point reaches the writes it is handed to, and nothing else: a
    saver without it writes during another's outage; with it, the save fails as an unreachable
    store would; the committer's manifest write fails the same way; after the outage, all pass."""
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    outage = StorageOutage()
    outage.start(60)
    plain = CheckpointSaver(uri, {}, False, 0, world1)
    plain.save(1, checkpoint_state(st, 0))
    plain.close()
    assert plain.reports[0].ok
    # One writer thread: the injected error stays on the saving thread (DCP's extra writer threads
    # would also report it as an unhandled thread exception).
    faulty = CheckpointSaver(uri, {}, False, 0, world1, retries=1, thread_count=1,
                             fault=outage.check)
    faulty.save(2, checkpoint_state(st, 0))
    (rep,) = faulty.reports
    assert not rep.ok and "storage unavailable (injected outage" in rep.error, rep.error
    c = Committer(uri, {}, 3, True, "hash0", EventLog(str(tmp_path / "events.jsonl")),
                  fault=outage.check)
    c.on_save(plain.reports[0])
    (failed,) = events_of(str(tmp_path / "events.jsonl"), "checkpoint_failed")
    assert failed["step"] == 1 and "injected outage" in failed["reason"]
    assert c.committed == []
    outage.start(0)  # over
    faulty.save(3, checkpoint_state(st, 0))
    faulty.close()
    assert faulty.reports[-1].ok
    c.on_save(faulty.reports[-1])
    assert c.committed == [3]


def test_a_fault_point_installed_later_reaches_the_next_save(world1, tmp_path):
    uri = str(tmp_path / "ck")
    _, st = _trained(1)
    saver = CheckpointSaver(uri, {}, False, 0, world1, retries=1, thread_count=1)
    outage = StorageOutage()
    outage.start(60)
    saver.set_fault(outage.check)
    saver.save(1, checkpoint_state(st, 0))
    saver.close()
    assert not saver.reports[0].ok and "injected outage" in saver.reports[0].error
