"""FSDP2 recovery from peers' memory (issue 11): the real CLI on an embedded Ray with 2 simulated
nodes, 4 workers, faults from outside (kill -9 of pids taken from events.jsonl).

The oracle: with a replacement in the lost rank, the final weights equal a failure-free FSDP2
run of plain torch on 4 processes bit for bit; when the world shrinks, the final loss is within
1% of it.
"""

import os
import signal
import time

import pytest

from conftest import ROOT, cli_process, run_cli
from conftest import run_events_of as _of, run_summary as _summary
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
STEPS = 120


@pytest.fixture(scope="module")
def reference():
    """Plain torch FSDP2, 4 gloo processes, the same task, batch and steps: (digest, losses)."""
    state, losses = run_world(4, "fsdp", steps=STEPS, gbs=16)
    return weights_digest(state), losses


def _checkpoints(run_dir):
    d = run_dir / "checkpoints"
    return [n for n in os.listdir(d) if n.startswith("step-")] if d.exists() else []


def _kill_from_outside(run_dir, pick, *overrides, after_step=30):
    """Run the job; once a progress event shows `after_step`, SIGKILL the generation-1 pids
    `pick(starts, buddies)` returns (rank -> pid, rank -> its buddy). Returns (returncode,
    output, victims)."""
    with cli_process(["run", CONFIG, "chaos.events=[]", f"train.steps={STEPS}",
                      "train.parallelism=fsdp", "checkpoint.interval_steps=0",
                      "failure.hang_timeout_s=5", "run.log_interval_s=0.2",
                      f"run.dir={run_dir}", *overrides]) as proc:
        deadline = time.monotonic() + 120
        while not any(e["step"] >= after_step for e in _of(run_dir, "progress")) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        starts = {e["rank"]: e["pid"] for e in _of(run_dir, "worker_start")
                  if e["generation"] == 1}
        formed = _of(run_dir, "group_formed")
        assert len(starts) == 4 and formed, "the group never trained"
        buddies = {int(r): b for r, b in formed[0]["buddies"].items()}
        victims = pick(starts, buddies)
        for rank in victims:
            os.kill(starts[rank], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    return proc.returncode, out, victims


def test_a_killed_rank_comes_back_from_memory_bit_identical(tmp_path, reference):
    """(7a) A worker SIGKILLed, a replacement available, checkpoints off: the state is rebuilt
    from the survivors' snapshots and the buddy's copy of the lost shard (no storage), at most
    one step is lost (snapshots every step), no survivor is restarted, and the final weights
    equal the failure-free FSDP2 run's."""
    run_dir = tmp_path / "run"
    code, out, victims = _kill_from_outside(run_dir, lambda starts, buddies: [2])
    assert code == 0, out
    (f,) = _of(run_dir, "failure_detected")
    assert f["kind"] == "process_exit" and f["ranks"] == [2]
    (rec,) = _of(run_dir, "recovered")
    assert rec["source"] == "memory" and rec["lost_steps"] <= 1 and rec["world_size"] == 4
    assert rec["transfer_bytes"] > 0
    # survivors blocked in queued collectives on peers that wait on the lost rank are released
    # in place (their group's connections shut down), not waited out to a kill
    assert rec["release_s"] < 10 and "did not leave the failed group" not in out
    newcomers = [e["rank"] for e in _of(run_dir, "worker_start") if e["generation"] == 2]
    assert newcomers == [2], "every survivor kept its process"
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["world_sizes"] == [4, 4]
    assert s["weights_digest"] == reference[0], "bit-identical to the failure-free run"
    assert not _checkpoints(run_dir), "nothing on storage to read"
    assert "state from memory" in out and "Traceback" not in out


def test_shrink_4_to_3_reshards_in_memory(tmp_path, reference):
    """(7b) No replacement, checkpoints off: the 4 old shards are cut into 3 new ones from
    memory; the job finishes and its loss stays within 1% of the 4-worker run's."""
    run_dir = tmp_path / "run"
    code, out, _ = _kill_from_outside(run_dir, lambda starts, buddies: [1],
                                      "failure.replace=false", "scaling.grow=false",
                                      "scaling.spare_workers=0")
    assert code == 0, out
    (rec,) = _of(run_dir, "recovered")
    assert rec["source"] == "memory" and rec["world_size"] == 3 and rec["lost_steps"] <= 1
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["world_sizes"] == [4, 3] and s["steps"] == STEPS
    assert abs(s["final_loss"] - reference[1][-1]) / reference[1][-1] < 0.01
    assert not _checkpoints(run_dir), "nothing on storage to read"


def _rank_and_buddy(starts, buddies):
    return [1, buddies[1]]


def test_a_rank_and_its_buddy_lost_together_fall_back_to_the_checkpoint(tmp_path, reference):
    """(7d) Rank 1 and the rank holding its copy killed at once: its shard is nowhere in memory,
    so the job restores the last committed checkpoint (never a mix of steps) and says why."""
    run_dir = tmp_path / "run"
    code, out, victims = _kill_from_outside(run_dir, _rank_and_buddy,
                                            "checkpoint.interval_steps=20", after_step=45)
    assert code == 0, out
    rec = _of(run_dir, "recovered")
    assert rec and rec[-1]["source"] == "checkpoint" and rec[-1]["resumed_step"] % 20 == 0
    assert "every copy of them were lost" in out or "did not form" in out
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == STEPS
    assert abs(s["final_loss"] - reference[1][-1]) / reference[1][-1] < 0.01


def test_a_rank_and_its_buddy_lost_without_a_checkpoint_exit_3_with_the_reason(tmp_path):
    """(7d) The same with checkpoints off: nothing holds rank 1's shard, so the job ends with
    exit 3 and a one-line reason, rather than start over or load a mixed state."""
    run_dir = tmp_path / "run"
    code, out, victims = _kill_from_outside(run_dir, _rank_and_buddy)
    assert code == 3, out
    assert "no committed checkpoint" in out and "Traceback" not in out
    s = _summary(run_dir)
    assert s["status"] == "failed" and s["recoveries"] == 0


def test_a_shrink_then_a_grow_keep_the_state_and_the_checkpoints(tmp_path):
    """A node lost (4 -> 2 from memory, no replacement), then a node joins (2 -> 4 from the
    members' snapshots, survivors renumbered in between):
    the loss stays within 1% of the failure-free run and every checkpoint after the grow
    commits. (Each generation names its own mesh: with one name for all, DTensor's cache handed
    the grown group the first generation's mesh and every later save failed DCP's plan check.)"""
    run_dir = tmp_path / "run"
    steps = 200  # room for the newcomers to start before the end
    proc = run_cli(["run", CONFIG, f"train.steps={steps}", "train.parallelism=fsdp",
                    "checkpoint.interval_steps=20", f"run.dir={run_dir}",
                    "scaling.spare_workers=0", "failure.replace=false",
                    "chaos.events=[{at_step: 25, action: kill_node, target: 0}, "
                    "{at_step: 30, action: add_node}]"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    formed = _of(run_dir, "group_formed")
    assert [e["source"] for e in formed][-1] == "memory" and formed[-1]["world_size"] == 4
    assert any(e["world_size"] < 4 for e in formed), "the node's loss shrank the group"
    assert not _of(run_dir, "checkpoint_failed"), "saves after the grow commit"
    grown_at = formed[-1]["step"]
    assert any(e["step"] > grown_at for e in _of(run_dir, "checkpoint_committed"))
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["world_sizes"][-1] == 4
    _, losses = run_world(4, "fsdp", steps=steps, gbs=16)
    assert abs(s["final_loss"] - losses[-1]) / losses[-1] < 0.01
