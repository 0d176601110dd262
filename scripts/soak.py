"""The chaos soak, run and reported: `configs/chaos_soak.yaml` (a seeded random mix of killed,
frozen and poisoned workers, frozen and removed nodes, kills during checkpoint writes and storage
outages), then one JSON report read from what the run wrote.

    .venv/bin/python scripts/soak.py [--run-dir DIR] [override ...]
    e.g. scripts/soak.py train.steps=600 chaos.random_faults=5     # a short one

Report: status, steps, faults injected (by action), failures detected (by kind), recoveries
(by state source), lost steps, non-finite steps skipped, rollbacks, checkpoints committed and
failed, and every committed checkpoint left re-verified (the checksum of every file against its
manifest). Exit 0 only when the job finished and no committed checkpoint is corrupt.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from coordinator.checkpoint.manifest import list_checkpoints  # noqa: E402
from coordinator.events import read_events  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "chaos_soak"))
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, as for `run`")
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.run_dir, "summary.json")):
        print(f"error: {a.run_dir} holds a finished run; pass --run-dir to a new directory",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "coordinator", "run",
           os.path.join(ROOT, "configs", "chaos_soak.yaml"), f"run.dir={a.run_dir}", *a.overrides]
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    with open(os.path.join(a.run_dir, "summary.json")) as f:
        summary = json.load(f)
    events = list(read_events(os.path.join(a.run_dir, "events.jsonl")))
    by = collections.Counter
    with open(os.path.join(a.run_dir, "config.yaml")) as f:  # the resolved config of the run
        ckpt = yaml.safe_load(f)["checkpoint"]
    uri = ckpt["uri"]
    options = ckpt.get("storage_options") or {}
    infos = list_checkpoints(uri, options, verify=True)
    report = {
        "status": summary["status"], "exit_code": rc, "wall_s": round(time.time() - t0, 1),
        "steps": summary["steps"], "total_steps": summary["total_steps"],
        "faults_injected": dict(by(e["action"] for e in events if e["event"] == "chaos")),
        "failures_detected": dict(by(e["kind"] for e in events
                                     if e["event"] == "failure_detected")),
        "recoveries": dict(by(e["source"] for e in events if e["event"] == "recovered")),
        "lost_steps": summary["lost_steps"],
        "recovery_s": [e["recovery_s"] for e in events if e["event"] == "recovered"],
        "nonfinite_steps": summary.get("nonfinite_steps", []),
        "rollbacks": summary.get("rollbacks", 0),
        "checkpoints_committed": summary["checkpoints_committed"],
        "checkpoints_failed": summary["checkpoints_failed"],
        "checkpoints_left": {c.step: c.status for c in infos},
        "checkpoints_verified_clean": all(c.status != "corrupt" for c in infos),
        "world_sizes": summary["world_sizes"],
        "weights_digest": summary["weights_digest"],
    }
    print(json.dumps(report, indent=1))
    return 0 if report["status"] == "finished" and report["checkpoints_verified_clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
