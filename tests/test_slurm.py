"""SLURM end to end on a real single-node cluster (slurmctld + slurmd + munge on 127.0.0.1, brought
up by scripts/slurm_ci_up.sh, which installs Debian's packages when missing): a batch job trains to
completion; a preemption notice (USR1 to the batch script) and a time limit's signal lead to an
emergency checkpoint, a requeue and a resumed run that ends with the uninterrupted run's weights."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from conftest import run_events as _events, run_summary as _summary
from dist_harness import run_world
from train.state import weights_digest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

PYTHON = sys.executable
CONFIG = "configs/slurm.yaml"


@pytest.fixture(scope="module")
def slurm():
    """A running SLURM; stopped at the end if this module started it."""
    running = shutil.which("sinfo") and subprocess.run(
        ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle"
    up = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_ci_up.sh")],
                        capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    if not running:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_ci_up.sh"), "down"],
                       timeout=60)


@pytest.fixture(scope="module")
def reference():
    """Plain torch DDP on 2 gloo processes (what a 2-CPU allocation runs): digest per step count."""
    cache = {}

    def digest(steps):
        if steps not in cache:
            state, _ = run_world(2, "ddp", steps=steps, gbs=16)
            cache[steps] = weights_digest(state)
        return cache[steps]
    return digest


def _sbatch(tmp_path, *options, steps, wait=False, pythonpath=None):
    """sbatch the job; `options` starting with '--' go to sbatch, the rest are overrides."""
    run_dir = tmp_path / "run"
    out = tmp_path / "slurm.out"
    env = dict(os.environ, PYTHON=PYTHON, RAY_LOG=str(tmp_path / "ray.log"))
    env.pop("RAY_ADDRESS", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    flags = [o for o in options if o.startswith("--")]
    overrides = [o for o in options if not o.startswith("--")]
    cmd = ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={out}", *flags,
           *(["--wait"] if wait else []), "slurm/train.sbatch", CONFIG, f"train.steps={steps}",
           "scaling.max_workers=2", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    return proc, run_dir, out


def _wait_gone(job, timeout_s=400):
    """Until the job (requeues included) has left the queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                           text=True)
        if not q.stdout.strip():
            return
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still queued after {timeout_s}s")


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def test_a_batch_job_trains_to_completion(slurm, tmp_path, reference):
    """(a)"""
    proc, run_dir, out = _sbatch(tmp_path, steps=100, wait=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr + _read(out)
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == 100 and s["world_sizes"] == [2]
    assert s["weights_digest"] == reference(100)
    log = _read(out)
    assert "1 of 1 nodes joined" in log and "coordinator exited with 0" in log


def test_usr1_checkpoints_requeues_and_resumes_bit_identical(slurm, tmp_path, reference):
    """(b) `scancel --signal=USR1 --batch JOBID` mid-run: the emergency checkpoint is committed,
    the job requeued, and the requeued run resumes from it and ends with the uninterrupted run's
    weights."""
    steps = 1500
    proc, run_dir, out = _sbatch(tmp_path, steps=steps)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while not any(e["event"] == "checkpoint_committed" for e in _events(run_dir)):
            assert time.monotonic() < deadline, _read(out)
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        _wait_gone(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    events = _events(run_dir)
    ends = [e for e in events if e["event"] == "job_end"]
    assert [e["status"] for e in ends] == ["interrupted", "finished"], _read(out)
    emergency = ends[0]["step"]
    assert 0 < emergency < steps
    committed = [e["step"] for e in events if e["event"] == "checkpoint_committed"]
    assert emergency in committed
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["resumed_from_step"] == emergency
    assert s["weights_digest"] == reference(steps)
    log = _read(out)
    assert "USR1 received" in log and "requeueing (requeue 1 of at most 5)" in log
    assert "requeued 1 of at most 5" in log


def test_time_limit_signal_takes_the_same_path(slurm, tmp_path, reference):
    """(c) a 2-minute `--time` with `--signal=B:USR1@70`: slurmctld sends it 70-100 s before
    the limit (its check runs every ~30 s): 20-50 s into each run (seen: 22-28 s, and once
    after 47 s), while training runs. Each sample costs 12 ms (scripts/slow_data.py: TinyGPT's
    samples, slower), so a step takes at least ~96 ms on any machine, and 600 steps (60 s or
    more) outlast the first run's signal whatever the CPU's speed. Each run is signalled before
    its limit, checkpoints and is requeued (the signal comes again in every run; each trains
    at least ~12 s, so at most 5 runs, within the 5 requeues allowed) until the job finishes."""
    steps = 600
    proc, run_dir, out = _sbatch(tmp_path, "--time=2", "--signal=B:USR1@70",
                                 "train.task=slow_data:SlowGPT", "train.task_args={cost_ms: 12}",
                                 steps=steps, pythonpath=os.path.join(ROOT, "scripts"))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        _wait_gone(job, timeout_s=500)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    ends = [e for e in _events(run_dir) if e["event"] == "job_end"]
    assert ends and ends[0]["status"] == "interrupted" and ends[-1]["status"] == "finished", \
        _read(out)
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == steps
    assert s["weights_digest"] == reference(steps)
    assert "USR1 received" in _read(out)


# ---- the scripts' own logic, with fake SLURM commands (in addition to the real runs above) ----

def _bash(script, env=None):
    full = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=30)


def test_ports_are_a_block_per_job_and_gpus_come_from_slurm():
    out = _bash("source slurm/lib.sh; slurm_port_base 7; slurm_port_base 407; "
                "slurm_port_base 8; ray_port_args 20700 head; slurm_gpus_per_node",
                env={"SLURM_JOB_GPUS": "0,1,3"})
    base7, base407, base8, args, gpus = out.stdout.splitlines()
    assert base7 == base407 == "20700" and base8 == "20800"  # blocks of 100, 400 jobs apart
    assert "--port=20700" in args and "--min-worker-port=20710" in args \
        and "--max-worker-port=20799" in args
    assert gpus == "3"
    out = _bash("source slurm/lib.sh; SLURM_JOB_NODELIST=n[1-3] slurm_nodes",
                env={"PATH": os.path.join(ROOT, "tests", "fake_slurm") + os.pathsep
                     + os.environ["PATH"]})
    assert out.stdout.split() == ["n1", "n2", "n3"], out.stderr


def test_submit_script_builds_the_sbatch_command(tmp_path):
    env = {"PATH": os.path.join(ROOT, "tests", "fake_slurm") + os.pathsep + os.environ["PATH"],
           "FAKE_SBATCH_LOG": str(tmp_path / "sbatch.args")}
    proc = _bash("scripts/submit_slurm.sh --nodes 3 --gpus-per-node 4 --time 2:00:00 "
                 "configs/slurm.yaml train.steps=10", env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "sbatch.args").read_text().split("\n")
    assert "--nodes=3" in args and "--gres=gpu:4" in args and "--no-kill" in args
    assert "--signal=B:USR1@120" in args and "--time=2:00:00" in args and "--exclusive" in args
    assert args[-4:-1] == ["slurm/train.sbatch", "configs/slurm.yaml", "train.steps=10"]
    assert "MAX_REQUEUES=5" in (tmp_path / "sbatch.args.env").read_text()
    bad = _bash("scripts/submit_slurm.sh configs/nope.yaml", env=env)
    assert bad.returncode == 2 and "config file 'configs/nope.yaml' not found" in bad.stderr
