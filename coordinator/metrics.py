"""Job metrics through Ray's metrics API, so a Prometheus scrape of the Ray cluster sees them.

Ray exports them from each node's metrics agent (`/metrics` on the node's metrics export port,
what `ray start --metrics-export-port` sets), prefixed `ray_`: `ray_elastic_steps_per_s`,
`ray_elastic_goodput`, `ray_elastic_failures_total`, `ray_elastic_checkpoint_stall_s`, ... Every
series carries the job name as the `job` tag. The goodput gauge is the live figure (time in
completed steps over wall time so far); the exact breakdown is computed from events.jsonl at the end
(`summary.json`, `python -m coordinator report`).
"""

from __future__ import annotations

from typing import Optional

from ray.util.metrics import Counter, Gauge, Histogram

STALL_BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]


class JobMetrics:
    """Created in the driver once Ray is connected; the controller reports to it."""

    def __init__(self, job: str):
        self.tags = {"job": job}
        keys = ("job",)
        self.step = Gauge("elastic_step", "Completed optimizer steps", tag_keys=keys)
        self.world_size = Gauge("elastic_world_size", "Workers in the current generation",
                                tag_keys=keys)
        self.steps_per_s = Gauge("elastic_steps_per_s", "Recent training steps per second",
                                 tag_keys=keys)
        self.goodput = Gauge("elastic_goodput",
                             "Time in completed steps over wall time since the job started "
                             "(live; the exact breakdown is in summary.json)", tag_keys=keys)
        self.failures = Counter("elastic_failures", "Worker failures detected, by kind",
                                tag_keys=("job", "kind"))
        self.stall = Histogram("elastic_checkpoint_stall_s",
                               "Training stall per committed checkpoint, seconds",
                               boundaries=STALL_BOUNDARIES, tag_keys=keys)
        self.persist = Gauge("elastic_checkpoint_persist_s",
                             "Background persist time of the last committed checkpoint, seconds",
                             tag_keys=keys)
        self.checkpoints = Counter("elastic_checkpoints", "Checkpoints committed", tag_keys=keys)
        self.eval_loss = Gauge("elastic_eval_loss", "The newest evaluation's held-out loss "
                               "(train.eval_interval_steps)", tag_keys=keys)

    def progress(self, step: int, world_size: int, steps_per_s: Optional[float],
                 goodput: Optional[float]) -> None:
        self.step.set(step, tags=self.tags)
        self.world_size.set(world_size, tags=self.tags)
        if steps_per_s is not None:
            self.steps_per_s.set(steps_per_s, tags=self.tags)
        if goodput is not None:
            self.goodput.set(goodput, tags=self.tags)

    def evaluated(self, loss: float) -> None:
        self.eval_loss.set(loss, tags=self.tags)

    def failure(self, kind: str, count: int) -> None:
        self.failures.inc(count, tags={**self.tags, "kind": kind})

    def checkpoint(self, stall_s: float, persist_s: float) -> None:
        self.stall.observe(stall_s, tags=self.tags)
        self.persist.set(persist_s, tags=self.tags)
        self.checkpoints.inc(1, tags=self.tags)
