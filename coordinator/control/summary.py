"""summary.json's fields, from what the job recorded (the runner adds the goodput breakdown)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from coordinator.config import Config
from coordinator.control.accounting import StepAccounting
from coordinator.control.state import JobRecord, Phase

STATUS = {Phase.DONE: "finished", Phase.INTERRUPTED: "interrupted"}  # anything else: failed


def startup(marks: Dict[str, float], first_step_t: Optional[float]) -> Dict[str, Any]:
    """startup_s: from the command's start to the first completed step; `startup`: its parts.
    `marks`: unix times of start, ray (connected), placed, ready, formed (None: not reached)."""
    order = [("launch_s", "start", "ray_init"), ("ray_s", "ray_init", "placed"),
             ("workers_s", "placed", "ready"), ("form_s", "ready", "formed"),
             ("first_step_s", "formed", "first_step")]
    t = dict(marks, first_step=first_step_t)
    parts = {name: round(t[b] - t[a], 3) for name, a, b in order
             if t.get(a) is not None and t.get(b) is not None}
    total = first_step_t - marks["start"] if first_step_t and marks.get("start") else None
    return {"startup_s": None if total is None else round(total, 3), "startup": parts}


def job_summary(cfg: Config, job: JobRecord, steps: StepAccounting, committer,
                isolated: List[str], phase: Phase, error: Optional[str], wall_s: float,
                extra: Dict[str, Any]) -> Dict[str, Any]:
    """`extra`: what the observers add (the auto interval's choice replaces the configured one)."""
    return {
        "job": cfg.job.name,
        "status": STATUS.get(phase, "failed"),
        "steps": steps.last_step,
        "total_steps": cfg.train.steps,
        "final_loss": steps.last_loss,
        "final_eval_loss": steps.last_eval_loss,  # the newest evaluation (train.eval_*)
        "weights_digest": job.digest,
        "world_sizes": job.world_sizes,
        "generations": job.generation,
        "failures": len(job.failures),
        "recoveries": len(job.recoveries),
        "lost_steps": sum(r["lost_steps"] for r in job.recoveries),
        "transfer_mismatches": job.transfer_mismatches,
        # FSDP2 in-memory snapshots: the peak host memory they held on one rank (its own and
        # its buddies' copies; checkpoint.memory_interval_steps)
        "memory_snapshot_bytes": job.memory_snapshot_bytes,
        # each worker process's peak resident memory (VmHWM), by pid, in MB, and the largest
        "peak_rss_mb": {str(pid): round(b / 2**20, 1) for pid, b in sorted(job.peak_rss.items())},
        "peak_rss_mb_max": round(max(job.peak_rss.values()) / 2**20, 1) if job.peak_rss else None,
        "resumed_from_step": job.resume.step if job.resume else None,
        "checkpoints_committed": len(committer.committed) if committer else 0,
        "checkpoints_failed": len(committer.failed) if committer else 0,
        "isolated_nodes": list(isolated),
        "nonfinite_steps": sorted(job.skipped),  # skipped on every rank (failure.nonfinite)
        "rollbacks": job.rollbacks,
        "steps_per_s": steps.steady_steps_per_s(),
        "wall_s": round(wall_s, 3),
        "step_s": round(steps.step_time_s, 3),  # time in steps (the slowest rank's, summed)
        "checkpoint_interval": cfg.checkpoint.interval_steps,
        **startup(job.startup, steps.first_step_t),
        "error": error,
        **extra,
    }
