"""Two `run` commands on one run directory or one checkpoint location (a command typed twice, a
requeued job whose previous run still runs): the second is refused at once and the first is not
disturbed; once the first is killed, the same command takes over and resumes."""

import os
import re
import time

import pytest

from coordinator.checkpoint.manifest import resolve_latest
from conftest import NO_CHAOS, ROOT, cli_process, run_cli
from conftest import run_events as _events, run_summary as _summary
from test_checkpoint_e2e import _kill_job, _start, _wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
SINCE = r"since \d\d:\d\d:\d\d"


def _refused(proc, key, where, pid, hint):
    """The one line of a refusal, and nothing else (no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    line = proc.stderr.strip()
    pattern = (rf"error: {key} {re.escape(str(where))} is in use by job 'local_cpu' \(host \S+, "
               rf"pid {pid}, {SINCE}\); stop it first or set {key} to another {hint}")
    assert re.fullmatch(pattern, line), line


def test_a_second_run_on_the_same_run_dir_is_refused_and_the_first_goes_on(tmp_path):
    run_dir = tmp_path / "run dir"
    args = ["run", CONFIG, NO_CHAOS, "train.steps=500", f"run.dir={run_dir}"]
    with cli_process(args) as first:
        _wait_for(lambda ev: [e for e in ev if e["event"] == "group_formed"], run_dir)
        before = len(_events(run_dir))
        t0 = time.monotonic()
        second = run_cli(args, timeout=120)
        took = time.monotonic() - t0
        assert first.poll() is None, "the first job was still running when refused"
        assert len(_events(run_dir)) >= before
        out, _ = first.communicate(timeout=300)
    _refused(second, "run.dir", run_dir, first.pid, "directory")
    assert took < 30, f"refused after {took:.1f}s"
    assert first.returncode == 0, out
    events = _events(run_dir)
    starts = [e for e in events if e["event"] == "job_start"]
    ends = [e for e in events if e["event"] == "job_end"]
    assert [e["pid"] for e in starts] == [first.pid], "one job wrote these events"
    assert [e["status"] for e in ends] == ["finished"]
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 500
    assert not (run_dir / "lease.json").exists(), "released on exit"
    assert not (run_dir / "checkpoints" / "lease.json").exists()


def test_the_same_checkpoint_uri_from_another_run_dir_is_refused_then_taken_over(tmp_path):
    uri = tmp_path / "shared ckpt"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    common = [CONFIG, NO_CHAOS, "checkpoint.interval_steps=50", f"checkpoint.uri={uri}"]
    first = _start([*common, "train.steps=100000", f"run.dir={first_dir}"])
    try:
        _wait_for(lambda ev: [e for e in ev if e["event"] == "checkpoint_committed"], first_dir)
        second = run_cli(["run", *common, "train.steps=100", f"run.dir={second_dir}"],
                         timeout=120)
        assert first.poll() is None, "the first job was still running when refused"
        _refused(second, "checkpoint.uri", uri, first.pid, "location")
        assert not (second_dir / "events.jsonl").exists() and not (second_dir / "lease.json").exists()
    finally:
        _kill_job(first, first_dir)  # SIGKILL: its leases stay behind, their pid dead
    assert (uri / "lease.json").exists()
    # The newest commit in storage: the kill can land between a manifest and its event.
    newest, _ = resolve_latest(str(uri), {}, verify=False)
    last = newest.step
    again = run_cli(["run", *common, f"train.steps={last + 20}", f"run.dir={second_dir}"],
                    timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.search(rf"lease: taking over checkpoint.uri {re.escape(str(uri))} from job "
                     rf"'local_cpu' \(host \S+, pid {first.pid}, gone\)", again.stdout), again.stdout
    formed = [e for e in _events(second_dir) if e["event"] == "group_formed"][0]
    assert formed["source"] == "checkpoint" and formed["step"] == last
    assert _summary(second_dir)["status"] == "finished"
    assert not (uri / "lease.json").exists()
