"""HSDP recovery (issue 11, test c): the real CLI on an embedded Ray with 3 simulated nodes,
4 workers in 2 shard groups of 2. A lost rank, then a whole node, take their shards from the
replicas in the other shard group's memory: no storage, no survivor restarted, and the final
weights equal a failure-free HSDP run of plain torch on 4 processes bit for bit."""

import os

import pytest

from conftest import ROOT, run_cli
from conftest import run_events_of as _of, run_summary as _summary
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(360)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
STEPS = 100


def test_a_rank_then_a_node_come_back_from_the_other_shard_group(tmp_path):
    state, _ = run_world(4, "hsdp", steps=STEPS, gbs=16, shard_group_size=2)
    reference = weights_digest(state)
    run_dir = tmp_path / "run"
    # 3 nodes of 2 slots: shard group 0 on one node, group 1 on another, the spare on the
    # third. Rank 1 is killed (the spare takes its rank), then the node of ranks 2 and 3 (both
    # replacements start on the slots left).
    proc = run_cli(["run", CONFIG, f"train.steps={STEPS}", "train.parallelism=hsdp",
                    "train.shard_group_size=2", "ray.simulated_nodes=3", "ray.cpus_per_node=2",
                    "checkpoint.interval_steps=0", f"run.dir={run_dir}",
                    "chaos.events=[{at_step: 30, action: kill_worker, target: 1}, "
                    "{at_step: 60, action: kill_node, target: 2}]"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    starts = _of(run_dir, "worker_start")
    first = {e["rank"]: e for e in starts if e["generation"] == 1}
    assert first[0]["node_id"] == first[1]["node_id"] != first[2]["node_id"] \
        == first[3]["node_id"], "a shard group shares a node"
    recs = _of(run_dir, "recovered")
    assert [r["source"] for r in recs] == ["memory", "memory"], out
    # snapshots every step: the step in flight when the loss came is the most one can lose
    assert all(r["lost_steps"] <= 1 for r in recs) and all(r["world_size"] == 4 for r in recs)
    newcomers = {g: sorted(e["rank"] for e in starts if e["generation"] == g) for g in (2, 3)}
    assert newcomers == {2: [1], 3: [2, 3]}, "every survivor kept its process"
    formed = _of(run_dir, "group_formed")
    assert all("buddies" not in f for f in formed), "two shard groups: the replicas are the copies"
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["world_sizes"] == [4, 4, 4]
    assert s["weights_digest"] == reference, "bit-identical to the failure-free HSDP run"
    assert not (run_dir / "checkpoints").exists() or \
        not [n for n in os.listdir(run_dir / "checkpoints") if n.startswith("step-")]
    assert "replicas in the other shard groups" in out and "Traceback" not in out
