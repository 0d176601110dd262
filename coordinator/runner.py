"""Run one job: connect to Ray, host the rendezvous store, drive the controller, write the run dir."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from coordinator.cluster import Cluster
from coordinator.config import Config
from coordinator.controller import Controller, Phase
from coordinator.events import EventLog, write_json_atomic
from coordinator.progress import ProgressReporter

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5  # how often RUNNING polls worker heartbeats
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 3, 130


def run_job(cfg: Config, reporter: ProgressReporter) -> int:
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    events = EventLog(os.path.join(run_dir, "events.jsonl"))
    events.emit("job_start", job=cfg.job.name, config_hash=cfg.config_hash(), pid=os.getpid())

    # Imported here so that config errors are reported before torch and Ray load.
    import torch.distributed as dist

    from coordinator.checkpoint.committer import Committer, absolute_uri
    from coordinator.worker import WorkerSpec
    from coordinator.worker_group import RayWorkerGroup

    cluster = Cluster(cfg)
    group = None
    controller = None
    status = "failed"
    error = None
    try:
        cluster.connect()
        # The rendezvous store lives in the driver: losing any worker, rank 0 included, leaves it up.
        store = dist.TCPStore(cluster.driver_ip(), 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        spec = WorkerSpec(
            task=cfg.train.task, task_args=dict(cfg.train.task_args), seed=cfg.job.seed,
            total_steps=cfg.train.steps, global_batch_size=cfg.train.global_batch_size,
            parallelism=cfg.train.parallelism, use_gpu=cfg.scaling.use_gpu,
            torch_threads=max(1, int(cfg.scaling.cpus_per_worker)),
            collective_timeout_s=cfg.train.collective_timeout_s,
            checkpoint_uri=absolute_uri(cfg.checkpoint.uri) if cfg.checkpoint.interval_steps else "",
            checkpoint_options=dict(cfg.checkpoint.storage_options),
            checkpoint_interval=int(cfg.checkpoint.interval_steps or 0),
            checkpoint_async=cfg.checkpoint.async_,
            checkpoint_final=bool(cfg.checkpoint.interval_steps))
        committer = Committer(cfg.checkpoint.uri, cfg.checkpoint.storage_options,
                              cfg.checkpoint.keep, cfg.checkpoint.verify_on_load,
                              cfg.config_hash(), events)
        group = RayWorkerGroup(spec, cfg.scaling.cpus_per_worker, cluster.driver_ip(), store.port,
                               start_timeout_s=cfg.failure.wait_for_workers_s)
        controller = Controller(cfg, group, events, cluster.capacity, committer)
        while not controller.done:
            tr = controller.step()
            if tr.progress is not None:
                reporter.update(tr.progress)
            if tr.before == tr.after and not controller.done:
                time.sleep(POLL_INTERVAL_S if tr.after == Phase.RUNNING else 1.0)
        status = "finished" if controller.phase == Phase.DONE else "failed"
    except KeyboardInterrupt:
        status = "interrupted"
        reporter.message("interrupted: stopping workers")
    except ConnectionError as e:  # ray.init found no cluster (e.g. ray.address=auto, none running)
        error = f"cannot connect to Ray ({cluster.address}): {str(e).splitlines()[0]}"
        logger.error("%s", error)
    except Exception as e:  # a bug or an unforeseen runtime failure: record it, then exit 3
        error = f"{type(e).__name__}: {e}"
        logger.exception("the coordinator failed: %s", error)
    finally:
        if group is not None:
            group.shutdown()
        cluster.shutdown()
        reporter.close_line()

    summary = controller.summary() if controller else {"job": cfg.job.name, "steps": 0}
    summary["status"] = status
    if error:
        summary["error"] = error
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    events.emit("job_end", status=status, step=summary.get("steps", 0))
    events.close()
    reporter.message(format_summary(summary, run_dir))
    return {"finished": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)


def format_summary(s: dict, run_dir: str) -> str:
    loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
    rate = f"{s['steps_per_s']:.1f}" if s.get("steps_per_s") else "-"
    lines = [
        f"== job {s.get('job')} {s['status']}: {s.get('steps', 0)}/{s.get('total_steps', '?')} "
        f"steps, final loss {loss}, {rate} steps/s",
        f"   world sizes {s.get('world_sizes')}, failures {s.get('failures', 0)}, "
        f"recoveries {s.get('recoveries', 0)}",
        f"   weights_digest {s.get('weights_digest')}",
        f"   run dir {run_dir} (summary.json, events.jsonl, config.yaml)",
    ]
    if s.get("error"):
        lines.insert(1, f"   error: {s['error']}")
    return "\n".join(lines)
