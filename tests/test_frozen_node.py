"""A node that stops answering without dying: every process of a simulated node really
SIGSTOPped (raylet and workers), then thawed. Detected from heartbeats within
failure.hang_timeout_s, treated as lost, the job finishes, nothing is left stopped, and every
committed checkpoint verifies clean (the thawed workers are fenced off the checkpoint location)."""

import os

import pytest

from conftest import ROOT, run_cli, run_events, run_summary

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None  # gone


def test_a_frozen_node_is_detected_in_seconds_and_the_job_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["run", CONFIG, "train.steps=200", "checkpoint.interval_steps=20",
                    "ray.cpus_per_node=2",
                    "chaos.events=[{at_step: 40, action: freeze_node, target: 0, seconds: 6}]",
                    f"run.dir={run_dir}"], timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 200 and s["recoveries"] >= 1
    events = run_events(run_dir)
    (chaos,) = [e for e in events if e["event"] == "chaos"]
    first = next(e for e in events if e["event"] == "failure_detected")
    assert first["kind"] == "hang" and chaos["rank"] in first["ranks"]
    assert first["t"] - chaos["t"] < 3.0 + 2.5, "found from heartbeats within the timeout"
    assert "frozen for 6s" in proc.stdout and "thawed" in proc.stdout
    assert "Traceback" not in proc.stdout
    pids = {e["pid"] for e in events if e["event"] == "worker_start"}
    assert not [p for p in pids if _state(p) == "T"], "a process was left stopped"
    check = run_cli(["inspect", str(run_dir / "checkpoints"), "--verify"])
    assert check.returncode == 0 and " 0 corrupt" in check.stdout, check.stdout + check.stderr
