"""The job configuration: a typed dataclass tree, loaded from YAML plus dotlist overrides.

OmegaConf is used at the edge only (`load_config`); everything past it receives plain dataclasses.
Every user mistake becomes a `ConfigError` whose message is one line naming the dotted key, the
bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException


class ConfigError(ValueError):
    """A user error in the configuration or the command line: exit 2, one line, no traceback."""


def _bad(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {allowed}")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise _bad(key, value, allowed)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TASK_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

PARALLELISMS = ("ddp", "fsdp", "hsdp")
PRECISIONS = ("fp32", "bf16")  # train.step.PRECISIONS (not imported: config stays torch-free)
HASHES = ("crc32c", "sha256")  # checkpoint.storage.HASHES, the default first
CHAOS_ACTIONS = (
    "kill_worker", "hang_worker", "kill_node", "add_node",
    "kill_during_checkpoint", "preempt", "storage_outage", "nonfinite", "freeze_node",
    "corrupt_transfer", "hog_memory",
)
RANK_ACTIONS = ("kill_worker", "hang_worker", "kill_node", "kill_during_checkpoint", "nonfinite",
                "freeze_node", "corrupt_transfer", "hog_memory")
NONFINITE_MODES = ("skip", "rollback", "stop")


@dataclass
class JobConfig:
    name: str = "job"  # names the run directory (runs/<name>) and the Ray job
    seed: int = 0  # seeds model init, data order and per-rank RNG

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(_NAME_RE.match(self.name)), "job.name",
               self.name, "use letters, digits, '.', '_' or '-', starting with a letter or digit")
        _check(0 <= self.seed < 2**31, "job.seed", self.seed, "must be an integer in [0, 2**31)")


@dataclass
class RunConfig:
    dir: Optional[str] = None  # run directory; default runs/<job.name> under the current directory
    # seconds between progress lines when stdout is not a terminal, and between `progress`
    # events and metric updates
    log_interval_s: float = 5.0
    # TensorBoard scalars under <run.dir>/tensorboard/ (loss, grad norm, steps/s, world size,
    # checkpoint stall, failures, recoveries), continued by step across reruns
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _check(self.dir is None or str(self.dir).strip() != "", "run.dir", self.dir,
               "must be a non-empty path (or unset for runs/<job.name>)")
        _check(self.log_interval_s > 0, "run.log_interval_s", self.log_interval_s, "must be > 0")


@dataclass
class RayConfig:
    # an existing cluster ("auto" on a head node, "host:port", "ray://..."); RAY_ADDRESS wins;
    # unset: an embedded Ray started in-process
    address: Optional[str] = None
    simulated_nodes: int = 0  # >0: start this many simulated nodes on this machine (embedded only)
    cpus_per_node: Optional[float] = None  # logical CPUs per simulated node; default: scaled to fit

    def __post_init__(self) -> None:
        _check(self.simulated_nodes >= 0, "ray.simulated_nodes", self.simulated_nodes,
               "must be >= 0 (0 = one plain local Ray node)")
        _check(self.cpus_per_node is None or self.cpus_per_node > 0, "ray.cpus_per_node",
               self.cpus_per_node, "must be > 0")


@dataclass
class ScalingConfig:
    min_workers: int = 1  # fewest workers the job may train with
    # most workers (one per CPU slot or GPU); the job starts as wide as capacity allows
    max_workers: int = 2
    use_gpu: bool = False  # one GPU per worker, nccl backend; otherwise CPU with gloo
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker (also its torch thread count)
    grow: bool = True  # add workers (up to max_workers) at a step boundary when capacity appears
    # idle workers kept started (torch imported, task and DDP model built) beyond max_workers
    # when the cluster has room, from the first step on: a lost worker is then replaced in a few
    # hundred ms instead of a process start (seconds); 0 = none
    spare_workers: int = 1
    grow_check_s: float = 2.0  # seconds between a running job's looks for capacity to grow into

    def __post_init__(self) -> None:
        _check(self.grow_check_s > 0, "scaling.grow_check_s", self.grow_check_s, "must be > 0")
        _check(self.spare_workers >= 0, "scaling.spare_workers", self.spare_workers,
               "must be >= 0")
        _check(self.min_workers >= 1, "scaling.min_workers", self.min_workers, "must be >= 1")
        _check(self.max_workers >= self.min_workers, "scaling.max_workers", self.max_workers,
               f"must be >= scaling.min_workers ({self.min_workers})")
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", self.cpus_per_worker,
               "must be > 0")


@dataclass
class TrainConfig:
    task: str = "train.tasks.gpt:TinyGPT"  # the user's Task class, as package.module:Class
    task_args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for the Task
    steps: int = 200  # total optimizer steps of the job
    global_batch_size: int = 16  # samples per step over all workers, whatever the world size
    # one of PARALLELISMS: ddp replicates, fsdp shards (FSDP2 fully_shard), hsdp shards within
    # groups of shard_group_size ranks and replicates across the groups
    parallelism: str = "ddp"
    # hsdp: ranks per shard group (each a full replica of the model, sharded). The world is
    # always a whole number of groups; consecutive ranks form a group (the same node where
    # the placement allows). Required under hsdp, unused otherwise.
    shard_group_size: Optional[int] = None
    collective_timeout_s: float = 120.0  # process-group timeout for one collective, in seconds
    # samples per forward pass on a rank: its slice of the global batch runs in micro-batches,
    # gradients accumulated and synchronised once per step, so per-rank memory does not grow
    # when the world shrinks; null: the whole slice in one pass
    micro_batch_size: Optional[int] = None
    precision: str = "fp32"  # fp32 | bf16 (bf16 compute, fp32 master weights and reductions)
    max_grad_norm: Optional[float] = None  # clip gradients by their global norm; null: off
    # steps between evaluations of the loss on a fixed held-out set (the task's eval_sample),
    # and at the last step; 0: off
    eval_interval_steps: int = 0
    eval_samples: int = 64  # held-out samples per evaluation, split over the ranks of any world
    # build the next step's batch on a background thread while the current step runs (the same
    # batches either way); false: on the training thread, for a sample() that is not thread-safe
    prefetch: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.task, str) and bool(_TASK_RE.match(self.task)), "train.task",
               self.task, "must be an import path 'package.module:Class'")
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size,
               "must be >= 1")
        _check(self.parallelism in PARALLELISMS, "train.parallelism", self.parallelism,
               f"must be one of {', '.join(PARALLELISMS)}")
        sgs = self.shard_group_size
        if self.parallelism == "hsdp":
            _check(isinstance(sgs, int) and not isinstance(sgs, bool) and sgs >= 1,
                   "train.shard_group_size", sgs, "must be an integer >= 1 under "
                   "train.parallelism=hsdp (ranks per shard group)")
        else:
            _check(sgs is None, "train.shard_group_size", sgs,
                   "applies to train.parallelism=hsdp only; leave it null")
        _check(self.collective_timeout_s > 0, "train.collective_timeout_s",
               self.collective_timeout_s, "must be > 0")
        mbs = self.micro_batch_size
        _check(mbs is None or (isinstance(mbs, int) and not isinstance(mbs, bool) and mbs >= 1),
               "train.micro_batch_size", mbs, "must be an integer >= 1, or null for the whole "
               "local slice at once")
        _check(self.precision in PRECISIONS, "train.precision", self.precision,
               f"must be one of {', '.join(PRECISIONS)}")
        _check(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float))
                                              and self.max_grad_norm > 0),
               "train.max_grad_norm", self.max_grad_norm, "must be > 0, or null for no clipping")
        for key in ("eval_interval_steps", "eval_samples"):
            v = getattr(self, key)
            least = 1 if key == "eval_samples" else 0
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= least, f"train.{key}",
                   v, f"must be an integer >= {least}" + (", 0 for no evaluation"
                                                          if key == "eval_interval_steps" else ""))


@dataclass
class CheckpointConfig:
    # any fsspec URI: a path, file://, s3://bucket/prefix, memory://; default <run.dir>/checkpoints
    uri: Optional[str] = None
    # steps between checkpoints; 0 = off; "auto": Young/Daly from the measured stall and failure
    # rate (see docs/goodput.md and coordinator/checkpoint/interval.py), re-chosen as
    # measurements arrive. With checkpoints on, the last step is saved too.
    interval_steps: Any = 0
    keep: int = 3  # committed checkpoints to keep (>= 2); older ones are deleted
    async_: bool = True  # YAML key `async`: persist in the background after an in-memory snapshot
    # async only: copy the parameters and optimizer state to host memory beside the next step's
    # forward and backward, its optimizer step waiting for the copy, instead of at the step
    # boundary (the stall drops from a memcpy of the state to almost nothing; see
    # docs/checkpoints.md). false for a task whose loss changes parameters in place.
    stage_beside_step: bool = True
    # passed to fsspec, e.g. {client_kwargs: {endpoint_url: ...}}
    storage_options: Dict[str, Any] = field(default_factory=dict)
    verify_on_load: bool = True  # recheck the checksum of every file before restoring
    # the checksum of every file in the manifest: crc32c (hardware-accelerated, ~4x sha256's
    # speed here) or sha256; either loads whatever a manifest names
    hash: str = "crc32c"
    # Seconds a save in flight may go without storage answering any of its writes, on every
    # rank, before it is given up (checkpoint_failed: "storage did not answer within N s") and
    # later saves go on without it. A frozen endpoint can hold a write forever (aiohttp has no
    # send timeout). 60 s is well above one healthy request (s3fs sends parts of 5-50 MiB;
    # botocore waits 5 s to connect and 20 s for an answer) yet a small share of an interval
    # between checkpoints; a save due meanwhile waits at most this long for its predecessor.
    persist_timeout_s: float = 60.0
    # FSDP2/HSDP: steps between in-memory snapshots of every rank's shard (model, optimizer,
    # scheduler, RNG, step), so a lost rank's shards come back from memory with no storage read
    # (docs/fault-tolerance.md): under fsdp each is copied to a buddy rank on another node; under
    # hsdp the other replica groups hold the same shards (a buddy only when there is one group).
    # null: 1 under fsdp and hsdp (every step), off under ddp (every rank holds a replica
    # already); 0: off
    memory_interval_steps: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.persist_timeout_s > 0, "checkpoint.persist_timeout_s",
               self.persist_timeout_s, "must be > 0 (seconds)")
        mi = self.memory_interval_steps
        _check(mi is None or (isinstance(mi, int) and not isinstance(mi, bool) and mi >= 0),
               "checkpoint.memory_interval_steps", mi, "must be an integer >= 0, or null")
        iv = self.interval_steps
        ok = iv == "auto" or (isinstance(iv, int) and not isinstance(iv, bool) and iv >= 0)
        _check(ok, "checkpoint.interval_steps", iv, "must be an integer >= 0 or 'auto'")
        _check(self.keep >= 2, "checkpoint.keep", self.keep, "must be >= 2")
        _check(self.hash in HASHES, "checkpoint.hash", self.hash,
               f"must be one of {', '.join(HASHES)}")


@dataclass
class FailureConfig:
    max_failures: int = 10  # failures the job may survive before it fails (exit 3)
    # seconds without a heartbeat answer while peers answer: the worker is hung, so it is killed
    # and reported (kind: hang). Heartbeats are answered by a thread that training never blocks,
    # so a slow step (a big model, a slow collective) keeps answering and is never a hang; when
    # no worker answers, no step must have completed for as long either.
    hang_timeout_s: float = 3.0
    # the same, for a worker whose last answer said it was in a long phase: building its model,
    # joining a generation (taking its state from peers or a checkpoint), writing a checkpoint
    # before training goes on, or taking the final digest. Heartbeats are answered through these
    # too; this is the slack for a process its machine starves (memory pressure, an overloaded
    # host), so a large model's long phases are never called a hang
    busy_hang_timeout_s: float = 60.0
    # seconds to wait for min_workers worth of capacity (at start and after a loss), then exit 3
    wait_for_workers_s: float = 60.0
    # true: a recovery starts replacements where capacity allows and waits for them (up to
    # replace_timeout_s), so the world keeps its size and a DDP run stays bit-identical;
    # false: re-form at once with the survivors (fastest), and grow back later (scaling.grow)
    replace: bool = True
    replace_timeout_s: float = 30.0  # seconds a recovery waits for placed replacements to start
    node_failure_limit: int = 3  # failures on one node before the job stops using it (0 = never)
    # seconds a node where Ray's memory monitor killed a worker of this job gets no new worker
    # (replacement or spare): the job shrinks or waits instead of feeding the pressure (0 = off)
    memory_pressure_s: float = 300.0
    # seconds to wait before re-forming after the 2nd failure in a row without a completed step,
    # doubling with each further one
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0  # cap of that wait, in seconds
    # Per-worker mean time between failures, in seconds: what `checkpoint.interval_steps: auto`
    # assumes until the run has seen a failure of its own (then the observed rate is used).
    # The job's MTBF is this divided by the world size. Default: one week per worker.
    expected_mtbf_s: float = 604_800.0
    # A step whose loss or gradient norm is non-finite on any rank (a bad batch, a hardware
    # fault) is never applied: every rank skips its optimizer step. Then skip: train on;
    # rollback: train on, and after nonfinite_limit such steps in a row restore the last
    # committed checkpoint and skip those steps' samples when replaying (a rollback counts
    # against max_failures); stop: end the job (exit 3) at the first one (docs/fault-tolerance.md)
    nonfinite: str = "rollback"
    nonfinite_limit: int = 3  # non-finite steps in a row before failure.nonfinite=rollback acts

    def __post_init__(self) -> None:
        _check(self.nonfinite in NONFINITE_MODES, "failure.nonfinite", self.nonfinite,
               f"must be one of {', '.join(NONFINITE_MODES)}")
        _check(isinstance(self.nonfinite_limit, int) and self.nonfinite_limit >= 1,
               "failure.nonfinite_limit", self.nonfinite_limit, "must be an integer >= 1")
        _check(self.expected_mtbf_s > 0, "failure.expected_mtbf_s", self.expected_mtbf_s,
               "must be > 0 (seconds between failures of one worker)")
        _check(self.replace_timeout_s >= 0, "failure.replace_timeout_s", self.replace_timeout_s,
               "must be >= 0")
        _check(self.node_failure_limit >= 0, "failure.node_failure_limit",
               self.node_failure_limit, "must be >= 0")
        _check(self.backoff_s >= 0, "failure.backoff_s", self.backoff_s, "must be >= 0")
        _check(self.backoff_max_s >= self.backoff_s, "failure.backoff_max_s", self.backoff_max_s,
               f"must be >= failure.backoff_s ({self.backoff_s})")
        _check(self.max_failures >= 0, "failure.max_failures", self.max_failures, "must be >= 0")
        _check(self.busy_hang_timeout_s >= self.hang_timeout_s, "failure.busy_hang_timeout_s",
               self.busy_hang_timeout_s, "must be at least failure.hang_timeout_s")
        _check(self.memory_pressure_s >= 0, "failure.memory_pressure_s", self.memory_pressure_s,
               "must be >= 0")
        _check(self.hang_timeout_s > 0, "failure.hang_timeout_s", self.hang_timeout_s,
               "must be > 0")
        _check(self.wait_for_workers_s >= 0, "failure.wait_for_workers_s",
               self.wait_for_workers_s, "must be >= 0")


@dataclass
class ChaosEvent:
    at_step: int = 0  # inject when the job reaches this step
    action: str = "kill_worker"  # one of CHAOS_ACTIONS
    # kill_worker, hang_worker, kill_during_checkpoint: the rank; nonfinite: the rank whose loss
    # (and so gradient) is made NaN in its next step; corrupt_transfer: the rank whose next state
    # sent to a peer is corrupted; kill_node: the rank whose node is removed; freeze_node: the
    # rank whose node is frozen (every process SIGSTOPped); add_node: how many nodes (default 1);
    # storage_outage: seconds (default 10); preempt: unused; hog_memory: the rank that fills its
    # node's memory past Ray's memory monitor threshold (RAY_memory_usage_threshold, 0.95)
    target: Any = None
    # freeze_node: how long the node stays frozen (default 15); hog_memory: how long the memory
    # is held if the monitor spares the rank (default 20)
    seconds: Optional[float] = None


@dataclass
class ChaosConfig:
    # scheduled faults for the local simulation: a list of {at_step, action, target}
    events: List[ChaosEvent] = field(default_factory=list)
    # A seeded random schedule on top of `events`: `random_faults` faults drawn from
    # `random_actions`, at least `random_min_gap` steps apart, targets drawn among live ranks.
    random_faults: int = 0
    random_seed: int = 0  # seed of the random schedule
    # the actions random faults are drawn from (any action but preempt)
    random_actions: List[str] = field(default_factory=lambda: [
        "kill_worker", "hang_worker", "kill_node", "kill_during_checkpoint"])
    random_min_gap: int = 25  # fewest steps between two random faults

    def actions(self) -> set:
        """Every action this schedule may fire (listed events and the random draw)."""
        return {e.action for e in self.events} | (
            set(self.random_actions) if self.random_faults else set())

    def __post_init__(self) -> None:
        for i, ev in enumerate(self.events):
            _check(ev.action in CHAOS_ACTIONS, f"chaos.events[{i}].action", ev.action,
                   f"must be one of {', '.join(CHAOS_ACTIONS)}")
            _check(ev.at_step >= 0, f"chaos.events[{i}].at_step", ev.at_step, "must be >= 0")
            if ev.seconds is not None:
                _check(ev.action in ("freeze_node", "hog_memory")
                       and isinstance(ev.seconds, (int, float))
                       and not isinstance(ev.seconds, bool) and ev.seconds > 0,
                       f"chaos.events[{i}].seconds", ev.seconds,
                       "is for freeze_node and hog_memory only, and must be a number > 0")
            if ev.action in RANK_ACTIONS:
                _check(isinstance(ev.target, int) and not isinstance(ev.target, bool)
                       and ev.target >= 0, f"chaos.events[{i}].target", ev.target,
                       f"must be a worker rank (an integer >= 0) for {ev.action}")
            elif ev.action in ("add_node", "storage_outage") and ev.target is not None:
                _check(isinstance(ev.target, (int, float)) and not isinstance(ev.target, bool)
                       and ev.target > 0, f"chaos.events[{i}].target", ev.target,
                       f"must be a number > 0 for {ev.action}")
        for a in self.random_actions:
            _check(a in CHAOS_ACTIONS and a != "preempt", "chaos.random_actions", a,
                   f"must be among {', '.join(x for x in CHAOS_ACTIONS if x != 'preempt')}")
        _check(self.random_faults >= 0, "chaos.random_faults", self.random_faults, "must be >= 0")
        _check(self.random_min_gap >= 1, "chaos.random_min_gap", self.random_min_gap,
               "must be >= 1")


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)  # what the job is called and seeded with
    run: RunConfig = field(default_factory=RunConfig)  # where the run writes and how it reports
    ray: RayConfig = field(default_factory=RayConfig)  # which Ray: an existing cluster or embedded
    scaling: ScalingConfig = field(default_factory=ScalingConfig)  # world size bounds, resources
    train: TrainConfig = field(default_factory=TrainConfig)  # what is trained, for how long, how
    # where checkpoints go, how often, how many stay (see docs/checkpoints.md)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # detection, recovery and the failure budget (see docs/fault-tolerance.md)
    failure: FailureConfig = field(default_factory=FailureConfig)
    # fault injection for the local simulation (see docs/fault-tolerance.md)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)

    def __post_init__(self) -> None:
        sgs = self.train.shard_group_size
        if sgs is not None:
            _check(self.scaling.max_workers >= sgs, "scaling.max_workers",
                   self.scaling.max_workers, f"must be >= train.shard_group_size ({sgs}): the "
                   "world is a whole number of shard groups")
        _check(self.train.global_batch_size >= self.scaling.max_workers,
               "train.global_batch_size", self.train.global_batch_size,
               f"must be >= scaling.max_workers ({self.scaling.max_workers}) so every worker "
               "gets at least one sample")
        if self.run.dir is None:
            self.run.dir = os.path.join("runs", self.job.name)
        if self.checkpoint.uri is None:
            self.checkpoint.uri = os.path.join(self.run.dir, "checkpoints")

    # ---- derived views -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain dict with the user-facing key names (`checkpoint.async`, not `async_`)."""
        d = dataclasses.asdict(self)
        d["checkpoint"]["async"] = d["checkpoint"].pop("async_")
        return d

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys whose YAML names are Python keywords: (section, yaml name, field name).
_RENAMES = [("checkpoint", "async", "async_")]


def _rename_keywords(raw: Any) -> Any:
    if isinstance(raw, dict):
        for section, yaml_key, attr in _RENAMES:
            sub = raw.get(section)
            if isinstance(sub, dict) and yaml_key in sub:
                sub[attr] = sub.pop(yaml_key)
    return raw


def _user_key(full_key: str) -> str:
    for section, yaml_key, attr in _RENAMES:
        full_key = full_key.replace(f"{section}.{attr}", f"{section}.{yaml_key}")
    return full_key


def _valid_keys(full_key: str) -> List[str]:
    """The valid keys of the section that holds `full_key`, in user spelling."""
    parts = full_key.split(".")
    if len(parts) < 2:
        return [f.name for f in dataclasses.fields(Config)]
    if parts[0] == "chaos" and len(parts) == 3:
        return [f.name for f in dataclasses.fields(ChaosEvent)]
    sections = {f.name: type(f.default_factory()) for f in dataclasses.fields(Config)}
    if parts[0] not in sections or len(parts) != 2:
        return []
    return [_user_key(f"{parts[0]}.{f.name}").split(".", 1)[1]
            for f in dataclasses.fields(sections[parts[0]])]


def _parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    for ov in overrides:
        if "=" not in ov or ov.startswith("="):
            raise ConfigError(f"override {ov!r}: expected key=value, e.g. train.steps=100")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {' '.join(overrides)!r}: {str(e).splitlines()[0]}") from None


def load_config(path: Optional[str], overrides: List[str] = ()) -> Config:
    """YAML file (optional) + dotlist overrides -> validated `Config`. Raises `ConfigError`."""
    layers: List[Dict[str, Any]] = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} not found")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path!r}: not valid YAML: "
                              f"{str(e).splitlines()[0]}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r}: top level must be a mapping of sections")
        layers.append(raw)
    layers.append(_parse_overrides(list(overrides)))
    sections = {f.name for f in dataclasses.fields(Config)}
    for layer in layers:
        for name, value in layer.items():
            if name in sections and value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name}={value!r}: must be a section of keys, "
                                  f"e.g. {name}.<key>=<value>")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config),
                                 *[OmegaConf.create(_rename_keywords(l)) for l in layers])
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except ConfigKeyError as e:
        key = _user_key(e.full_key or str(e.key))
        valid = _valid_keys(e.full_key or "")
        if e.object_type is ChaosEvent:
            key = f"chaos.events[].{e.key}"
            valid = [f.name for f in dataclasses.fields(ChaosEvent)]
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        raise ConfigError(f"{key}: unknown key{hint}") from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{_user_key(e.full_key)}: a value is required") from None
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        msg = str(e).splitlines()[0]
        key = _user_key(getattr(e, "full_key", "") or "")
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    assert isinstance(cfg, Config)
    return cfg


def memory_interval(cfg: "Config") -> int:
    """Steps between in-memory shard snapshots (checkpoint.memory_interval_steps resolved):
    every step under fsdp and hsdp unless set, never under ddp (its replicas are the copies)."""
    if cfg.train.parallelism == "ddp":
        return 0
    mi = cfg.checkpoint.memory_interval_steps
    return 1 if mi is None else int(mi)
