"""Every config error: exit 2, one line naming the dotted key and value, nothing started."""

import os

import pytest

from conftest import run_cli
from coordinator.config import ConfigError, load_config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("overrides, expect", [
    (["train.steps=abc"], "train.steps"),
    (["train.steps=0"], "train.steps=0"),
    (["train.stepz=5"], "train.stepz: unknown key; valid keys here: task, task_args, steps"),
    (["nosuch.key=1"], "nosuch: unknown key; valid keys here: job, run, ray"),
    (["train.parallelism=tp"], "train.parallelism='tp': must be one of ddp, fsdp, hsdp"),
    (["train.parallelism=hsdp"], "train.shard_group_size=None: must be an integer >= 1 under "
                                 "train.parallelism=hsdp"),
    (["train.parallelism=hsdp", "train.shard_group_size=0"], "train.shard_group_size=0"),
    (["train.shard_group_size=2"], "train.shard_group_size=2: applies to "
                                   "train.parallelism=hsdp only"),
    (["train.parallelism=hsdp", "train.shard_group_size=8", "scaling.max_workers=4"],
     "scaling.max_workers=4: must be >= train.shard_group_size (8)"),
    (["train.global_batch_size=0"], "train.global_batch_size=0"),
    (["train.global_batch_size=3", "scaling.max_workers=4"],
     "train.global_batch_size=3: must be >= scaling.max_workers (4)"),
    (["train.task=not a path"], "train.task='not a path'"),
    (["train.collective_timeout_s=0"], "train.collective_timeout_s=0"),
    (["scaling.min_workers=0"], "scaling.min_workers=0"),
    (["scaling.min_workers=3", "scaling.max_workers=2"], "scaling.max_workers=2: must be >= "),
    (["scaling.cpus_per_worker=-1"], "scaling.cpus_per_worker=-1"),
    (["scaling.use_gpu=maybe"], "scaling.use_gpu"),
    (["ray.simulated_nodes=-1"], "ray.simulated_nodes=-1"),
    (["ray.cpus_per_node=0"], "ray.cpus_per_node=0"),
    (["job.name=has space"], "job.name='has space'"),
    (["job.seed=-3"], "job.seed=-3"),
    (["run.log_interval_s=0"], "run.log_interval_s=0"),
    (["checkpoint.keep=1"], "checkpoint.keep=1: must be >= 2"),
    (["checkpoint.interval_steps=often"], "checkpoint.interval_steps='often'"),
    (["checkpoint.interval_steps=-5"], "checkpoint.interval_steps=-5"),
    (["checkpoint.async=perhaps"], "checkpoint.async"),
    (["checkpoint.asink=true"], "checkpoint.asink: unknown key; valid keys here: uri, "
                                "interval_steps, keep, async"),
    (["failure.max_failures=-1"], "failure.max_failures=-1"),
    (["failure.hang_timeout_s=0"], "failure.hang_timeout_s=0"),
    (["failure.wait_for_workers_s=-1"], "failure.wait_for_workers_s=-1"),
    (["chaos.events=[{at_step: 3, action: explode}]"], "chaos.events[0].action='explode'"),
    (["chaos.events=[{at_step: 3, when: 1}]"], "chaos.events[].when: unknown key"),
    (["chaos.events=[{at_step: 3, action: kill_worker}]"],
     "chaos.events[0].target=None: must be a worker rank"),
    (["chaos.events=[{at_step: 3, action: storage_outage, target: -2}]"],
     "chaos.events[0].target=-2: must be a number > 0"),
    (["chaos.random_actions=[preempt]"], "chaos.random_actions='preempt'"),
    (["failure.node_failure_limit=-1"], "failure.node_failure_limit=-1"),
    (["failure.backoff_s=5", "failure.backoff_max_s=1"], "failure.backoff_max_s=1"),
    (["scaling.spare_workers=-1"], "scaling.spare_workers=-1"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0: must be an integer >= 1"),
    (["train.precision=fp16"], "train.precision='fp16': must be one of fp32, bf16"),
    (["train.max_grad_norm=0"], "train.max_grad_norm=0.0: must be > 0"),
    (["train.eval_interval_steps=-1"], "train.eval_interval_steps=-1: must be an integer >= 0"),
    (["train.eval_samples=0"], "train.eval_samples=0: must be an integer >= 1"),
    (["checkpoint.hash=md5"], "checkpoint.hash='md5': must be one of crc32c, sha256"),
    (["train=5"], "train=5: must be a section"),
    (["train.steps"], "override 'train.steps': expected key=value"),
])
def test_bad_values_name_the_key(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert expect in msg, msg
    assert "\n" not in msg


def test_good_config_resolves_defaults(root):
    cfg = load_config(os.path.join(root, "configs", "local_cpu.yaml"),
                      ["train.steps=7", "checkpoint.async=false", "checkpoint.interval_steps=auto"])
    assert cfg.train.steps == 7
    assert cfg.checkpoint.async_ is False and cfg.checkpoint.interval_steps == "auto"
    assert cfg.run.dir == os.path.join("runs", "local_cpu")
    assert cfg.checkpoint.uri == os.path.join("runs", "local_cpu", "checkpoints")
    assert "async: false" in cfg.to_yaml() and "async_" not in cfg.to_yaml()
    # The hash is stable for equal configs and changes with any value.
    assert cfg.config_hash() == load_config(os.path.join(root, "configs", "local_cpu.yaml"), [
        "train.steps=7", "checkpoint.async=false", "checkpoint.interval_steps=auto"]).config_hash()
    assert cfg.config_hash() != load_config(None, []).config_hash()


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad file's.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(str(scalar))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="train.lr: unknown key"):
        load_config(str(unknown))


@pytest.mark.parametrize("args, expect", [
    (["run", "configs/local_cpu.yaml", "train.parallelism=zero"], "train.parallelism='zero'"),
    (["run", "configs/local_cpu.yaml", "train.task=nosuch.module:Task"],
     "cannot import module 'nosuch.module'"),
    (["run", "configs/local_cpu.yaml", "train.task=train.tasks.gpt:Nope"], "has no class 'Nope'"),
    (["run", "configs/local_cpu.yaml", "train.task_args={dim: 30, heads: 4}"],
     "train.task_args="),
    (["run", "configs/local_cpu.yaml", "checkpoint.uri=nosuchscheme://bucket/x"],
     "checkpoint.uri='nosuchscheme://bucket/x'"),
    (["run", "configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
    (["run", "configs/local_cpu.yaml", "ray.address=127.0.0.1:1"],
     "ray.address='127.0.0.1:1': nothing answers at 127.0.0.1:1"),
    (["run", "configs/local_cpu.yaml", "ray.simulated_nodes=0"],
     "chaos add_node/kill_node removes, freezes or adds simulated nodes"),
    (["run", "configs/local_cpu.yaml", "chaos.events=[{at_step: 1, action: kill_worker, "
      "target: 7}]"], "chaos.events[0].target=7: no such rank with scaling.max_workers=4"),
    (["run"], "error: the following arguments are required: config"),
    (["frobnicate"], "error: argument verb: invalid choice"),
])
def test_cli_exit_2_one_line_no_traceback(args, expect, tmp_path):
    proc = run_cli(args + ([f"run.dir={tmp_path}/r"] if len(args) > 2 else []), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(tmp_path / "r"), "nothing may be written for a bad config"


def test_evaluation_of_a_task_without_eval_sample_is_refused_at_once(tmp_path):
    (tmp_path / "noeval.py").write_text(
        "from train.tasks.mlp import MLPRegression\n"
        "class NoEval(MLPRegression):\n"
        "    eval_sample = __import__('train.task', fromlist=['Task']).Task.eval_sample\n")
    proc = run_cli(["run", "configs/local_cpu.yaml", "train.task=noeval:NoEval",
                    "train.eval_interval_steps=10", f"run.dir={tmp_path}/r"],
                   env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.eval_interval_steps=10: noeval:NoEval has no eval_sample" in proc.stderr
    assert not os.path.exists(tmp_path / "r")
