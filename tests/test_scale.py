"""A training state of 1.2 GB (the built-in GPT at ~101M parameters, AdamW), where the small
model's figures say nothing: a worker killed mid-run is recovered from its peers' memory with no
step lost, no healthy worker is ever called hung (saves here take several times
failure.hang_timeout_s), the final weights equal a failure-free run's, and no worker's peak
memory exceeds a plain run's plus one copy of the training state."""

import json
import os

import pytest

from conftest import NO_CHAOS, ROOT, run_cli, run_events, run_summary
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONFIG = os.path.join(ROOT, "configs", "local_cpu.yaml")
BIG = {"dim": 1024, "layers": 8, "heads": 8, "seq_len": 8, "vocab_size": 256}
STEPS, GBS, KILL_AT, HANG_S = 6, 4, 4, 1.0
STATE_BYTES = 12 * 101_260_288  # weights and AdamW's two moments, 4 bytes each


def test_a_1_2gb_state_recovers_from_peers_bit_identical_within_a_copy_of_plain_memory(
        tmp_path):
    ref_rss = []
    state, _ = run_world(2, "ddp", steps=STEPS, task_args=BIG, gbs=GBS, peak_rss=ref_rss)
    reference = weights_digest(state)
    del state
    run_dir = tmp_path / "run"
    task_args = "{" + ", ".join(f"{k}: {v}" for k, v in BIG.items()) + "}"
    proc = run_cli(["run", CONFIG, NO_CHAOS, "ray.simulated_nodes=0", "scaling.min_workers=1",
                    "scaling.max_workers=2", f"train.task_args={task_args}",
                    f"train.steps={STEPS}", f"train.global_batch_size={GBS}",
                    # a save the step waits for: a long phase on the training thread
                    "checkpoint.interval_steps=3", "checkpoint.async=false",
                    "checkpoint.hash=sha256",  # slower than crc32c: a longer save
                    f"failure.hang_timeout_s={HANG_S}", f"run.dir={run_dir}",
                    f"chaos.events=[{{at_step: {KILL_AT}, action: kill_worker, target: 1}}]"],
                   cwd=str(tmp_path), timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = run_events(run_dir)
    failures = [e for e in events if e["event"] == "failure_detected"]
    assert [(f["kind"], f["ranks"]) for f in failures] == [("process_exit", [1])], failures
    (rec,) = [e for e in events if e["event"] == "recovered"]
    assert rec["source"] == "peer" and rec["lost_steps"] == 0 and rec["world_size"] == 2
    # only the newcomer took the state: one replica's worth, no more
    assert STATE_BYTES <= rec["transfer_bytes"] < STATE_BYTES * 1.01, rec
    saves = [e for e in events if e["event"] == "checkpoint_committed"]
    assert saves and max(e["persist_s"] for e in saves) > 3 * HANG_S, \
        f"a save took longer than 3x failure.hang_timeout_s: {saves}"
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == STEPS and s["recoveries"] == 1
    assert s["weights_digest"] == reference, "bit-identical to the failure-free run"
    bound = max(ref_rss) + STATE_BYTES
    peaks = {pid: mb * 2**20 for pid, mb in s["peak_rss_mb"].items()}
    assert len(peaks) >= 3, s["peak_rss_mb"]  # the two ranks, the killed one and the spare
    assert max(peaks.values()) <= bound, (
        f"peak RSS per worker {json.dumps(s['peak_rss_mb'])} MB over plain + one state copy "
        f"({bound / 2**20:.0f} MB; plain {max(ref_rss) / 2**20:.0f} MB)")
