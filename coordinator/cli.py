"""`python -m coordinator <verb>`: the command line. Exit codes: 0 done, 2 bad config or usage,
or run.dir / checkpoint.uri in use by another job (before any cluster starts), 3 the job failed
(or another job took its lease over), 130 interrupted."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from coordinator.config import RANK_ACTIONS, Config, ConfigError, load_config

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other usage error
        self.exit(EXIT_USAGE, f"error: {message} (see python -m coordinator --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m coordinator",
                description="Elastic data-parallel PyTorch training on Ray.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a job", description=(
        "Run a job. CONFIG is a YAML file; key=value overrides follow OmegaConf's dotlist syntax, "
        "e.g. train.steps=100 scaling.max_workers=4."))
    run.add_argument("config", help="YAML config file, e.g. configs/local_cpu.yaml")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ins = sub.add_parser("inspect", help="list the checkpoints under a URI", description=(
        "List the checkpoints under URI (local path or fsspec URI such as s3://bucket/run): step, "
        "status (committed / incomplete / corrupt), world size, size. Exit 1 if a committed "
        "checkpoint fails verification. S3 endpoints and credentials come from the standard AWS "
        "variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."))
    ins.add_argument("uri", help="the checkpoint location (checkpoint.uri of the run)")
    ins.add_argument("--verify", action="store_true", help="recheck every file's checksum")
    rep = sub.add_parser("report", help="goodput breakdown and failure timeline of a run",
                         description=(
        "Print where a run's time went (productive training, checkpoint stalls, failure "
        "detection, re-formation, restore, recomputed steps, waiting for capacity, start-up, "
        "shutdown), from RUN_DIR/events.jsonl, and write RUN_DIR/timeline.png."))
    rep.add_argument("run_dir", help="the run directory (run.dir of the job, e.g. runs/local_cpu)")
    return p


def check_runnable(cfg: Config) -> None:
    """Checks that need more than the config tree (imports), still before any Ray process."""
    from train.task import make_task

    try:
        task = make_task(cfg.train.task, dict(cfg.train.task_args))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from train.task import has_eval

    if cfg.train.eval_interval_steps and not has_eval(task):
        raise ConfigError(f"train.eval_interval_steps={cfg.train.eval_interval_steps}: "
                          f"{cfg.train.task} has no eval_sample (see train.task.Task), or set "
                          "train.eval_interval_steps=0")
    from coordinator.checkpoint.storage import filesystem

    try:
        filesystem(cfg.checkpoint.uri, cfg.checkpoint.storage_options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from coordinator.cluster import probe_address, ray_address

    address = ray_address(cfg)
    why = probe_address(address) if address else None
    if why:
        source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
        raise ConfigError(f"{source}={address!r}: {why}; start the cluster or fix the address")
    node_actions = {"kill_node", "add_node", "freeze_node"}
    wanted = cfg.chaos.actions()
    if wanted & node_actions and (address or not cfg.ray.simulated_nodes):
        raise ConfigError(f"chaos {'/'.join(sorted(wanted & node_actions))} removes, freezes or "
                          "adds simulated nodes: it needs an embedded cluster with "
                          "ray.simulated_nodes > 0 (and no ray.address / RAY_ADDRESS)")
    for i, ev in enumerate(cfg.chaos.events):
        if isinstance(ev.target, int) and ev.action in RANK_ACTIONS \
                and ev.target >= cfg.scaling.max_workers:
            raise ConfigError(f"chaos.events[{i}].target={ev.target}: no such rank with "
                              f"scaling.max_workers={cfg.scaling.max_workers}")


class _ReporterHandler(logging.Handler):
    def __init__(self, reporter):
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.message(self.format(record))


def _setup_logging(reporter) -> None:
    # Our own loggers only: Ray owns the root logger's handlers.
    handler = _ReporterHandler(reporter)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
    for name in ("coordinator", "train"):
        log = logging.getLogger(name)
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        log.propagate = False


def already_finished(cfg: Config) -> Optional[str]:
    """Why a rerun of `cfg` would train nothing (its run is done), or None. Read-only: the
    newest committed checkpoint's manifest (sizes and checksums are checked at a real resume),
    or, without checkpoints, a finished summary.json."""
    import json

    from coordinator.checkpoint import manifest as mf

    again = ("raise train.steps to train on, or give a new run.dir (and checkpoint.uri) to "
             "start afresh")
    try:
        chosen, _ = mf.resolve_latest(cfg.checkpoint.uri, cfg.checkpoint.storage_options,
                                      verify=False)
    except (OSError, ValueError):  # unreadable here: the run itself will say why
        chosen = None
    if chosen is not None and chosen.step >= cfg.train.steps:
        return (f"job {cfg.job.name} already finished: step {chosen.step} of "
                f"train.steps={cfg.train.steps} is committed in {cfg.checkpoint.uri}; {again}")
    if chosen is None:
        try:
            with open(os.path.join(cfg.run.dir, "summary.json"), encoding="utf-8") as f:
                s = json.load(f)
        except (OSError, ValueError):
            return None
        if s.get("status") == "finished" and s.get("total_steps") == cfg.train.steps:
            return (f"job {cfg.job.name} already finished: {cfg.run.dir}/summary.json says "
                    f"{s.get('steps')}/{cfg.train.steps} steps; {again}")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "run":
        try:
            cfg = load_config(args.config, args.overrides)
            check_runnable(cfg)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return EXIT_USAGE
        from coordinator.lease import LeaseError, leases_for
        from coordinator.progress import ProgressReporter

        reporter = ProgressReporter(interval_s=cfg.run.log_interval_s)
        _setup_logging(reporter)  # before the lease: a takeover is logged
        # Before anything is written to run.dir: a second job on it is refused untouched.
        leases = leases_for(cfg.run.dir, cfg.checkpoint.uri, cfg.checkpoint.storage_options,
                            cfg.job.name)
        try:
            leases.acquire()
        except LeaseError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:  # while a requeue waits for its previous run's lease
            return 130
        with leases:
            done = already_finished(cfg)
            if done:  # said before Ray starts: a rerun would restore and end at once
                print(done)
                return 0
            from coordinator.runner import run_job

            return run_job(cfg, reporter, leases)
    if args.verb == "inspect":
        from coordinator.inspect_cmd import run_inspect

        return run_inspect(args.uri, args.verify, {})
    if args.verb == "report":
        from coordinator.goodput.report import run_report

        try:
            return run_report(args.run_dir)
        except BrokenPipeError:  # `report RUN_DIR | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    raise AssertionError(f"unhandled verb {args.verb}")
