"""Run one job: connect to Ray, host the rendezvous store, drive the controller, write the run dir."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import timedelta
from typing import Optional

from coordinator import STARTED_T
from coordinator.cluster import Cluster
from coordinator.config import Config, memory_interval
from coordinator.control.controller import Controller
from coordinator.control.observers import Bus, standard_observers
from coordinator.control.state import Phase
from coordinator.control.summary import STATUS
from coordinator.events import Event, EventLog, write_json_atomic
from coordinator.goodput import accounting
from coordinator.goodput.report import model_check
from coordinator.lease import LeaseLost, Leases
from coordinator.progress import ProgressReporter

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5  # how often RUNNING polls worker heartbeats
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 3, 130


def run_job(cfg: Config, reporter: ProgressReporter, leases: Optional[Leases] = None) -> int:
    """`leases`: the run's (acquired, see coordinator/lease.py); the job stops, exit 3, when one
    is taken over, and then writes nothing more into a run directory that is no longer its own."""
    run_dir = cfg.run.dir
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(cfg.to_yaml())
    events = EventLog(os.path.join(run_dir, "events.jsonl"))
    events.emit(Event.JOB_START, job=cfg.job.name, config_hash=cfg.config_hash(), pid=os.getpid())

    # torch and the driver's modules (~2 s) are imported while Ray starts (its processes come up
    # meanwhile); after the config was checked, so that its errors come first.
    importer = threading.Thread(target=_import_driver_modules, name="imports", daemon=True)
    importer.start()
    auto = cfg.checkpoint.interval_steps == "auto"
    cluster = Cluster(cfg)
    group = bus = None
    controller = None
    status = "failed"
    error = None
    try:
        t_ray = time.time()
        cluster.connect()
        importer.join()
        import torch.distributed as dist

        from coordinator.chaos import ClusterHooks
        from coordinator.checkpoint.faults import StorageOutage
        from coordinator.checkpoint.committer import Committer, absolute_uri
        from coordinator.metrics import JobMetrics
        from coordinator.workers.spec import WorkerSpec
        from coordinator.workers.worker_group import RayWorkerGroup

        # The rendezvous store lives in the driver: losing any worker, rank 0 included, leaves it up.
        store = dist.TCPStore(cluster.driver_ip(), 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        spec = WorkerSpec(
            task=cfg.train.task, task_args=dict(cfg.train.task_args), seed=cfg.job.seed,
            total_steps=cfg.train.steps, global_batch_size=cfg.train.global_batch_size,
            parallelism=cfg.train.parallelism, shard_group_size=cfg.train.shard_group_size,
            use_gpu=cfg.scaling.use_gpu,
            torch_threads=max(1, int(cfg.scaling.cpus_per_worker)),
            collective_timeout_s=cfg.train.collective_timeout_s,
            # Checkpoints are written when periodic saves are on, or when a preemption notice
            # asks for an emergency one (checkpoint.interval_steps=0 still takes that one).
            checkpoint_uri=absolute_uri(cfg.checkpoint.uri),
            checkpoint_options=dict(cfg.checkpoint.storage_options),
            # auto: the controller asks for each checkpoint (checkpoint/interval.py)
            checkpoint_interval=0 if auto else int(cfg.checkpoint.interval_steps or 0),
            checkpoint_async=cfg.checkpoint.async_,
            checkpoint_beside_step=cfg.checkpoint.stage_beside_step,
            checkpoint_persist_timeout_s=cfg.checkpoint.persist_timeout_s,
            checkpoint_hash=cfg.checkpoint.hash,
            memory_interval=memory_interval(cfg),
            eval_interval_steps=cfg.train.eval_interval_steps,
            eval_samples=cfg.train.eval_samples, prefetch=bool(cfg.train.prefetch),
            checkpoint_final=bool(cfg.checkpoint.interval_steps),
            nonfinite=cfg.failure.nonfinite, nonfinite_limit=cfg.failure.nonfinite_limit,
            micro_batch_size=cfg.train.micro_batch_size, precision=cfg.train.precision,
            max_grad_norm=None if cfg.train.max_grad_norm is None
            else float(cfg.train.max_grad_norm))
        bus = Bus(events)
        # chaos only: the driver's manifest writes fail during an injected storage outage
        outage = StorageOutage() if "storage_outage" in cfg.chaos.actions() else None
        committer = Committer(cfg.checkpoint.uri, cfg.checkpoint.storage_options,
                              cfg.checkpoint.keep, cfg.checkpoint.verify_on_load,
                              cfg.config_hash(), bus, fault=outage.check if outage else None,
                              guard=(lambda: leases.check("checkpoint.uri")) if leases else None,
                              log_path=os.path.join(run_dir, "logs", "checkpoint-errors.log"),
                              background=True)
        group = RayWorkerGroup(spec, cfg.scaling.cpus_per_worker, store, cluster.driver_ip(),
                               cluster.free_slots, start_timeout_s=cfg.failure.wait_for_workers_s,
                               hang_timeout_s=cfg.failure.hang_timeout_s,
                               busy_hang_timeout_s=cfg.failure.busy_hang_timeout_s,
                               memory_pressure_s=cfg.failure.memory_pressure_s)
        hooks = ClusterHooks(remove_node=cluster.remove_node_of,
                             add_node=cluster.add_node_if_simulated,
                             preempt=lambda: os.kill(os.getpid(), signal.SIGUSR1),
                             storage_outage=outage.start if outage else lambda s: None,
                             freeze_node=cluster.freeze_node_of)
        controller = Controller(cfg, group, bus, cluster.capacity, committer)
        controller.job.startup.update(start=STARTED_T, ray_init=t_ray)
        standard_observers(cfg, bus, group, controller.steps.warmup_steps, hooks,
                           JobMetrics(cfg.job.name))
        restore_signals = _install_preemption_handlers(controller, reporter)
        while not controller.done:
            if leases is not None and leases.lost is not None:
                raise LeaseLost(leases.lost.lost_message())
            tr = controller.step()
            if tr.progress is not None:
                reporter.update(tr.progress)
            if tr.before == tr.after and not controller.done:
                if tr.after in (Phase.RUNNING, Phase.PAUSING):
                    group.wait(POLL_INTERVAL_S)
                elif tr.after == Phase.FORMING and tr.note.startswith("forming generation"):
                    pass  # poll_form itself waits for the joins (50 ms at most)
                elif tr.after == Phase.RECOVERING and tr.note != "waiting for capacity":
                    group.wait(0.05)  # wakes as soon as a survivor's train call returns
                else:
                    # capacity is asked of Ray's state API: once a second is enough
                    time.sleep(1.0 if tr.note == "waiting for capacity" else 0.05)
        # the last commits (the final checkpoint's manifest) before the summary counts them
        committer.drain(cfg.checkpoint.persist_timeout_s)
        status = STATUS.get(controller.phase, "failed")
    except LeaseLost as e:  # another job took over: stop at once (no emergency checkpoint)
        error = str(e)
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
        if controller is not None:
            restore_signals()
        if group is not None:
            group.shutdown()
        cluster.shutdown()
        if bus is not None:
            bus.close()  # observers' files (TensorBoard) flushed
        reporter.close_line()

    if leases is not None and not leases.ours("run.dir"):  # read now: it may be another job's
        events.close()
        reporter.message(f"error: {leases.lease('run.dir').lost_message()} "
                         "(no summary.json written)")
        return EXIT_FAILED
    summary = controller.summary() if controller else {"job": cfg.job.name, "steps": 0}
    summary["status"] = status
    if error:
        summary["error"] = error
    events.emit(Event.JOB_END, status=status, step=summary.get("steps", 0),
                last_step_t=controller.steps.last_step_t if controller else None)
    events.close()
    # Over every attempt of this run directory (reruns append to the same events.jsonl).
    try:
        events_so_far = accounting.run_events(run_dir)
        summary["goodput"] = accounting.breakdown(events_so_far)
        summary["goodput"]["model_check"] = model_check(summary["goodput"], events_so_far)
    except Exception as e:  # the accounting must never cost the summary
        logger.exception("goodput accounting failed")
        summary["goodput"] = {"error": f"{type(e).__name__}: {e}"}
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    reporter.message(format_summary(summary, run_dir))
    return {"finished": EXIT_OK, "interrupted": EXIT_INTERRUPTED}.get(status, EXIT_FAILED)


def _import_driver_modules() -> None:
    """What the driver needs once Ray is up (see run_job). An import that fails here is raised
    again, with its traceback, by the same import in run_job."""
    try:
        import torch.distributed  # noqa: F401

        import coordinator.checkpoint.committer  # noqa: F401
        import coordinator.workers.worker_group  # noqa: F401
    except Exception:
        pass


def _install_preemption_handlers(controller: Controller, reporter: ProgressReporter):
    """SIGTERM and SIGUSR1 (what SLURM and spot reclaimers send ahead of a kill) ask the
    controller for an emergency checkpoint and a clean stop (exit 130). Returns a function that
    puts the previous handlers back."""
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        reporter.message(f"{name} received: checkpointing, then stopping")
        controller.request_preempt(name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use): no handlers
            pass

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
    return restore


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict, run_dir: str) -> str:
    g = s.get("goodput") or {}
    loss = f"{s['final_loss']:.4f}" if s.get("final_loss") is not None else "-"
    rate = f"{s['steps_per_s']:.1f}" if s.get("steps_per_s") else "-"
    ev = f", eval loss {s['final_eval_loss']:.4f}" if s.get("final_eval_loss") is not None else ""
    lines = [
        f"== job {s.get('job')} {s['status']}: {s.get('steps', 0)}/{s.get('total_steps', '?')} "
        f"steps, final loss {loss}{ev}, {rate} steps/s",
        f"   world sizes {s.get('world_sizes')}, failures {s.get('failures', 0)}, "
        f"recoveries {s.get('recoveries', 0)}" + (
            f", peer state transfers that failed their checksum {s['transfer_mismatches']}"
            if s.get("transfer_mismatches") else ""),
        f"   weights_digest {s.get('weights_digest')}",
        f"   goodput {_pct(g.get('goodput'))} of {g.get('wall_s', 0):.0f}s wall "
        f"(python -m coordinator report {run_dir} for the breakdown and a timeline)",
        f"   run dir {run_dir} (summary.json, events.jsonl, config.yaml)",
    ]
    if s.get("error"):
        lines.insert(1, f"   error: {s['error']}")
    return "\n".join(lines)
